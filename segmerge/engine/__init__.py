"""segmerge.engine"""
