"""fedgate.proxy"""
