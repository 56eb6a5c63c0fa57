"""segmerge.objectives"""
