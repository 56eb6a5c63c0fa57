"""segmerge.aggregation"""
