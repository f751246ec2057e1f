"""Where each role's heads sit in the projection output: the contract between the model and the kernels.

The kernels read queries, keys and values straight out of the projection output (`[batch, seq, cols]`,
unit stride along the columns) and write the input gradient back in the same layout, so nothing is split,
repeated or summed on the way. One `Columns` describes either the fused `in_proj` output (one source
tensor) or the `q_proj` / `kv_proj` pair used when there are fewer KV heads than tensor-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..variants import AttentionLayout


@dataclass(frozen=True)
class Columns:
    """Column offsets of every head.

    Query head j of KV group g is column `q_base + g * q_group_stride + j * head_dim` of the query source;
    its key and value are columns `k_base + g * kv_group_stride` and `v_base + g * kv_group_stride` of the
    key/value source. Output head g * q_per_group + j (the order of the query rows in the fused layout).
    """

    groups: int
    q_per_group: int
    head_dim: int
    q_base: int
    q_group_stride: int
    k_base: int
    v_base: int
    kv_group_stride: int
    one_source: bool  # queries, keys and values are all read from one tensor (the fused projection)

    @property
    def heads(self) -> int:
        return self.groups * self.q_per_group

    @property
    def kv_shared(self) -> bool:
        """K=V: one tile serves both products; one gradient (dK + dV) is written."""
        return self.k_base == self.v_base

    @property
    def q_is_k(self) -> bool:
        """Q=K (and Q=K=V): the query column is the key column; its gradient is dQ + dK."""
        return self.one_source and self.q_base == self.k_base and self.q_group_stride == self.kv_group_stride

    @classmethod
    def fused(cls, lay: AttentionLayout) -> "Columns":
        """The fused projection of `lay` (this rank's local layout): group blocks of `slots_per_group` slots."""
        d, block = lay.head_dim, lay.slots_per_group * lay.head_dim
        q_base = 0 if lay.sharing in ("none", "kv") else lay.k_slot * d
        return cls(lay.num_kv_heads, lay.q_per_group, d, q_base, block, lay.k_slot * d, lay.v_slot * d, block, True)

    @classmethod
    def split(cls, heads: int, head_dim: int, kv_shared: bool) -> "Columns":
        """`q_proj` output (`heads` query heads, all reading one KV group) and the group's `kv_proj` rows."""
        return cls(1, heads, head_dim, 0, heads * head_dim, 0, 0 if kv_shared else head_dim, 2 * head_dim, False)
