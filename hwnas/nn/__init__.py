"""Networks: sliceable blocks, the SPOS supernet and standalone subnets."""
