"""segmerge.data"""
