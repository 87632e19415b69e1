"""KV-cache data movement: store new K/V rows at their slots, and pack/unpack whole blocks
of one or several layers to/from a contiguous staging buffer for the transfer layer.

Cache layout per layer: [N, 2, bs, Hkv, D]; one block's K and V are contiguous
(E = 2 * bs * Hkv * D elements), so packing is a gather of E-element rows by block id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import device_sms, next_pow2, use_triton
from .reference import pack_blocks_ref, store_kv_ref, unpack_blocks_ref


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr,
    s_kt, s_kh, s_vt, s_vh,  # k, v [T, Hkv, D] strides
    s_cb, s_ckv, s_ct, s_ch,  # cache [N, 2, bs, Hkv, D] strides
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    dst = (slot // PAGE) * s_cb + (slot % PAGE) * s_ct + offs_h[:, None] * s_ch + offs_d[None, :]
    dtype = cache_ptr.dtype.element_ty
    k = tl.load(k_ptr + t * s_kt + offs_h[:, None] * s_kh + offs_d[None, :], mask=mask)
    tl.store(cache_ptr + dst, k.to(dtype), mask=mask)
    v = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vh + offs_d[None, :], mask=mask)
    tl.store(cache_ptr + s_ckv + dst, v.to(dtype), mask=mask)


def store_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache [N, 2, bs, Hkv, D]; k, v [T, Hkv, D]; slot_mapping [T] int (slot < 0: skip)."""
    if not use_triton(kv_cache, _store_kv_kernel):
        store_kv_ref(kv_cache, k, v, slot_mapping)
        return
    T, H, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and kv_cache.stride(-1) == 1
    cs = kv_cache.stride()
    _store_kv_kernel[(T,)](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cs[0], cs[1], cs[2], cs[3], H=H, D=D, BLOCK_H=next_pow2(H), BLOCK_D=next_pow2(D),
        PAGE=kv_cache.shape[2], **({"num_warps": 4} if kv_cache.is_cuda else {}))


@triton.jit
def _copy_blocks_kernel(
    cache0_ptr,  # typed base pointer: caches[0]
    layer_off_ptr,  # [L] int64: element offset of caches[l] from caches[0]
    ids_ptr,  # [nb] block ids
    stage_ptr,  # [L, nb, E] staging buffer
    nb, E, piece,  # piece: elements per program along E (a multiple of BLOCK)
    PACK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    i = tl.program_id(0)
    layer = tl.program_id(1)
    start = tl.program_id(2) * piece
    stop = tl.minimum(start + piece, E)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    cache_base = tl.load(layer_off_ptr + layer) + blk * E
    stage_base = (layer.to(tl.int64) * nb + i) * E
    for s0 in range(start, stop, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        mask = offs < stop
        c_off = cache_base + offs
        s_off = stage_base + offs
        if ALIGNED:  # every row start is 16-byte aligned: let loads/stores vectorize
            c_off = tl.max_contiguous(tl.multiple_of(c_off, 16), BLOCK)
            s_off = tl.max_contiguous(tl.multiple_of(s_off, 16), BLOCK)
        if PACK:
            x = tl.load(cache0_ptr + c_off, mask=mask)
            tl.store(stage_ptr + s_off, x, mask=mask)
        else:
            x = tl.load(stage_ptr + s_off, mask=mask)
            tl.store(cache0_ptr + c_off, x, mask=mask)


_OFFSETS_CACHE: dict[tuple, torch.Tensor] = {}


def _layer_offsets(caches: Sequence[torch.Tensor]) -> torch.Tensor:
    """[L] int64 on the caches' device: (data_ptr(l) - data_ptr(0)) / element size. Cached."""
    esize = caches[0].element_size()
    ptrs = tuple(c.data_ptr() for c in caches)
    key = (caches[0].device, esize, ptrs)
    offs = _OFFSETS_CACHE.get(key)
    if offs is None:
        diffs = [p - ptrs[0] for p in ptrs]
        assert all(d % esize == 0 for d in diffs), "caches must share an element alignment"
        if len(_OFFSETS_CACHE) > 64:
            _OFFSETS_CACHE.clear()
        offs = torch.tensor([d // esize for d in diffs], dtype=torch.int64, device=caches[0].device)
        _OFFSETS_CACHE[key] = offs
    return offs


def _copy_blocks(caches: Sequence[torch.Tensor], block_ids: torch.Tensor,
                 staging: torch.Tensor, pack: bool) -> None:
    c0 = caches[0]
    block_ids = block_ids.to(c0.device, non_blocking=True)
    L, nb = len(caches), block_ids.numel()
    E = c0[0].numel() if c0.shape[0] else 0
    for c in caches:
        assert c.shape == c0.shape and c.dtype == c0.dtype == staging.dtype and c.is_contiguous()
    assert staging.is_contiguous() and staging.numel() == L * nb * E
    if nb == 0 or E == 0:
        return
    interp = not c0.is_cuda
    block = 256 if interp else 4096
    layer_offs = _layer_offsets(caches)
    # every row start a multiple of 16 elements from the (16-byte aligned) base pointers
    aligned = E % 16 == 0 and all((c.data_ptr() - c0.data_ptr()) % (16 * c0.element_size()) == 0
                                  for c in caches)
    blocks_per_row = triton.cdiv(E, block)
    pieces = max(1, min(blocks_per_row, triton.cdiv(4 * device_sms(c0), nb * L)))
    piece = triton.cdiv(blocks_per_row, pieces) * block
    grid = (nb, L, triton.cdiv(E, piece))
    _copy_blocks_kernel[grid](
        c0, layer_offs, block_ids, staging, nb, E, piece,
        PACK=pack, BLOCK=block, ALIGNED=aligned and not interp,
        **({} if interp else {"num_warps": 8}))


def _as_list(caches: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    if isinstance(caches, torch.Tensor):
        return [caches], True
    return list(caches), False


def pack_blocks(caches: torch.Tensor | Sequence[torch.Tensor], block_ids: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather blocks by id into a contiguous staging buffer.

    caches: one layer's cache [N, *block] or a list of L such (same shape/dtype);
    block_ids: [nb] int32/int64 on the caches' device.
    Returns [nb, *block] for a single tensor, else [L, nb, *block] (or fills `out`).
    """
    layers, single = _as_list(caches)
    c0 = layers[0]
    shape = (block_ids.numel(), *c0.shape[1:]) if single else (len(layers), block_ids.numel(), *c0.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=c0.dtype, device=c0.device)
    if not use_triton(c0, _copy_blocks_kernel):
        res = pack_blocks_ref(layers, block_ids)
        out.copy_(res[0] if single else res)
        return out
    _copy_blocks(layers, block_ids, out, pack=True)
    return out


def unpack_blocks(staging: torch.Tensor, caches: torch.Tensor | Sequence[torch.Tensor],
                  block_ids: torch.Tensor) -> None:
    """Scatter a staging buffer from pack_blocks back: caches[l][block_ids[i]] = staging[l, i]."""
    layers, single = _as_list(caches)
    if not use_triton(layers[0], _copy_blocks_kernel):
        unpack_blocks_ref(staging.unsqueeze(0) if single else staging, layers, block_ids)
        return
    _copy_blocks(layers, block_ids, staging, pack=False)
