"""segmerge.inference"""
