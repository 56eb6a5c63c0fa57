"""segmerge.step"""
