"""Attention math with no diffusers knowledge: pure-PyTorch references, masks, FlexAttention and Triton kernels."""

__all__: list[str] = []
