"""Attention pieces on torch that several drivers and the execution wing share (not plug-ins): dense calls and
calls with log-sum-exp (:mod:`.attention_ops`), the split of a plan into globals and windows (:mod:`.split`),
ring steps (:mod:`.ring_step`), and a plan as FlexAttention tiles (:mod:`.block_mask`)."""
