"""Selective-scan and causal-conv backends behind one dispatching function each, and the projections' matmul."""
