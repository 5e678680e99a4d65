"""fedgate.rdma"""
