"""segmerge.nets"""
