"""segmerge.study"""
