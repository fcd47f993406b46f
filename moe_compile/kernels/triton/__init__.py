"""Triton kernels of the `triton` backend (the launcher and registration live in `kernels/triton_moe.py`).

`align`: routed rows sorted by expert on the device; `experts`: the gate_up and down grouped GEMMs; `configs`:
tile shapes by token count.
"""
