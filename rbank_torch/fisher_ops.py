"""Low-level diagonal-Fisher operations over lists of tensors.

Every function here works on *lists* of tensors of any shapes (one per model parameter, or a single
``[N, D]`` per-pattern Fisher), groups them by ``(device, dtype)`` and runs one ``torch._foreach_*``
call per group, so the cost is a handful of kernel launches whatever the number of tensors. Nothing
here reads a value back to the host: flags such as "were these gradients finite?" stay 0-dim device
tensors and are applied with ``torch.where`` / tensor-valued factors.

The skip of a non-finite step needs one selection (``torch.where``), which has no ``_foreach``
form; :class:`FlatBuffer` keeps a group of tensors as views of one contiguous 1-D buffer so that the
selection is a single flat operation.

Example:
    >>> import torch
    >>> F = FlatBuffer.zeros([(3,), (2, 2)], dtype=torch.float32, device="cpu")
    >>> g = [torch.ones(3), torch.full((2, 2), 2.0)]
    >>> ok = fisher_ema_(F, g, decay=0.5)
    >>> F.views[1]
    tensor([[2., 2.],
            [2., 2.]])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "FlatBuffer",
    "group_by_device_dtype",
    "all_finite",
    "tensor_norms",
    "fisher_ema_",
    "penalty_grad_",
    "penalty_value",
    "constrain_",
]

Key = tuple[torch.device, torch.dtype]


def group_by_device_dtype(tensors: Sequence[torch.Tensor]) -> dict[Key, list[int]]:
    """Indices of ``tensors`` grouped by ``(device, dtype)``, in first-seen order.

    Args:
        tensors: any tensors.

    Returns:
        ``{(device, dtype): [i, ...]}``; every index appears exactly once.
    """
    groups: dict[Key, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


@dataclass
class FlatBuffer:
    """Tensors of several shapes stored as views of one contiguous 1-D buffer.

    Attributes:
        flat: ``[M]`` the storage, ``M = sum(numel)``.
        views: one tensor per shape, each a view into ``flat`` (writing a view writes ``flat``).
        shapes: the shapes of ``views``.
    """

    flat: torch.Tensor
    views: list[torch.Tensor]
    shapes: list[torch.Size]

    @classmethod
    def wrap(cls, flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> FlatBuffer:
        """Build the views of ``shapes`` over an existing 1-D ``flat`` tensor of the right length."""
        sizes = [torch.Size(s) for s in shapes]
        numels = [s.numel() for s in sizes]
        if flat.dim() != 1 or flat.numel() != sum(numels):
            raise ValueError(f"flat must be 1-D with {sum(numels)} elements, got shape {tuple(flat.shape)}")
        views = [v.view(s) for v, s in zip(flat.split(numels), sizes)] if sizes else []
        return cls(flat, views, sizes)

    @classmethod
    def zeros(
        cls, shapes: Sequence[Sequence[int]], *, dtype: torch.dtype, device: torch.device | str
    ) -> FlatBuffer:
        """A zero-filled buffer for ``shapes``.

        Example:
            >>> FlatBuffer.zeros([(2,), (1, 3)], dtype=torch.float32, device="cpu").flat.shape
            torch.Size([5])
        """
        total = sum(torch.Size(s).numel() for s in shapes)
        return cls.wrap(torch.zeros(total, dtype=dtype, device=device), shapes)

    @classmethod
    def from_tensors(
        cls, tensors: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None
    ) -> FlatBuffer:
        """A detached copy of ``tensors`` (all on one device) as one flat buffer."""
        if not tensors:
            raise ValueError("tensors must not be empty")
        dtype = dtype or tensors[0].dtype
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        return cls.wrap(flat, [t.shape for t in tensors])

    def empty_like(self, dtype: torch.dtype | None = None) -> FlatBuffer:
        """An uninitialised buffer with the same layout (and ``dtype`` if given)."""
        return FlatBuffer.wrap(torch.empty_like(self.flat, dtype=dtype or self.flat.dtype), self.shapes)

    def clone(self) -> FlatBuffer:
        """A deep copy."""
        return FlatBuffer.wrap(self.flat.clone(), self.shapes)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlatBuffer:
        """The same values on ``device`` / in ``dtype`` (``self`` when nothing changes)."""
        flat = self.flat.to(device=device or self.flat.device, dtype=dtype or self.flat.dtype)
        return self if flat is self.flat else FlatBuffer.wrap(flat, self.shapes)

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype


def _as_flat(fishers: FlatBuffer | Sequence[torch.Tensor]) -> list[tuple[FlatBuffer | None, list[torch.Tensor]]]:
    if isinstance(fishers, FlatBuffer):
        return [(fishers, list(fishers.views))]
    return [(None, list(fishers))]


def _combine_flags(flags: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    out = flags[0].to(device)
    for f in flags[1:]:
        out = out & f.to(device)
    return out


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite, as a 0-dim bool tensor (no host sync).

    Uses one ``_foreach_norm`` per (device, dtype) group; a tensor so large that its L2 norm overflows
    float32 also counts as non-finite.

    Args:
        tensors: non-empty list of floating-point tensors.

    Returns:
        0-dim ``torch.bool`` on the first tensor's device.
    """
    if not tensors:
        raise ValueError("tensors must not be empty")
    device = tensors[0].device
    flags = []
    for (_dev, dt), idx in group_by_device_dtype(tensors).items():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=torch.promote_types(torch.float32, dt))
        flags.append(torch.isfinite(torch.stack(norms).sum()))
    return _combine_flags(flags, device)


def tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, ``[P]`` float32 on the first tensor's device, in input order."""
    if not tensors:
        raise ValueError("tensors must not be empty")
    device = tensors[0].device
    norms: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for (_dev, dt), idx in group_by_device_dtype(tensors).items():
        acc = torch.promote_types(torch.float32, dt)
        for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, dtype=acc)):
            norms[i] = n.to(device, torch.float32)
    return torch.stack(norms)


def fisher_ema_(
    fishers: FlatBuffer | Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    decay: float,
    *,
    finite: torch.Tensor | None = None,
    scratch: FlatBuffer | None = None,
) -> torch.Tensor:
    """In place ``F ← decay·F + (1 − decay)·g²``, skipped entirely when any ``g`` is non-finite.

    The skip needs no host sync: the new values are computed into a scratch buffer and selected with
    one ``torch.where`` per group, so a skipped step leaves ``F`` bit-for-bit unchanged (no decay).

    Args:
        fishers: a :class:`FlatBuffer` (fast path, one group) or a list of tensors (any shapes, e.g. a
            single ``[N, D]`` per-pattern Fisher); updated in place.
        grads: tensors shaped like ``fishers`` (any floating dtype; ``g²`` is computed in the Fisher dtype).
        decay: EMA decay in ``[0, 1)``.
        finite: optional precomputed 0-dim bool flag; when ``None`` the flag is "every new value is
            finite" (a ``g²`` that overflows counts as non-finite).
        scratch: optional :class:`FlatBuffer` with the layout of ``fishers`` (FlatBuffer case only) to
            avoid an allocation per call.

    Returns:
        The 0-dim bool flag actually applied (True when ``F`` was updated).

    Example:
        >>> F = [torch.zeros(2)]
        >>> fisher_ema_(F, [torch.tensor([1.0, float("nan")])], 0.9)
        tensor(False)
        >>> F[0]
        tensor([0., 0.])
    """
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"decay must be within [0, 1), got {decay}")
    parts = _as_flat(fishers)
    fish_list = parts[0][1]
    if len(fish_list) != len(grads):
        raise ValueError(f"grads must have {len(fish_list)} tensors (one per Fisher), got {len(grads)}")
    if not fish_list:
        return torch.ones((), dtype=torch.bool) if finite is None else finite
    flat_in = parts[0][0]
    # per group: (target flat or list, new flat, new views, indices)
    staged: list[tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]] = []
    flags: list[torch.Tensor] = []
    if flat_in is not None:
        new = scratch if scratch is not None else flat_in.empty_like()
        if new.flat.shape != flat_in.flat.shape or new.dtype != flat_in.dtype or new.device != flat_in.device:
            raise ValueError("scratch must have the layout, dtype and device of fishers")
        torch.mul(flat_in.flat, decay, out=new.flat)  # [M]
        torch._foreach_addcmul_(new.views, list(grads), list(grads), value=1.0 - decay)
        staged.append((flat_in.flat, [], new.flat, new.views))
        if finite is None:
            flags.append(torch.isfinite(new.flat.sum(dtype=torch.float32)))
    else:
        for (dev, dt), idx in group_by_device_dtype(fish_list).items():
            fs = [fish_list[i] for i in idx]
            gs = [grads[i] for i in idx]
            new = FlatBuffer.zeros([f.shape for f in fs], dtype=dt, device=dev)
            torch._foreach_copy_(new.views, fs)
            new.flat.mul_(decay)
            torch._foreach_addcmul_(new.views, gs, gs, value=1.0 - decay)
            staged.append((None, fs, new.flat, new.views))
            if finite is None:
                flags.append(torch.isfinite(new.flat.sum(dtype=torch.float32)))
    ok = finite if finite is not None else _combine_flags(flags, fish_list[0].device)
    for target, fs, new_flat, new_views in staged:
        ok_d = ok.to(new_flat.device)
        if target is not None:
            torch.where(ok_d, new_flat, target, out=target)
        else:
            old = torch.cat([f.reshape(-1) for f in fs])
            torch.where(ok_d, new_flat, old, out=new_flat)
            torch._foreach_copy_(fs, new_views)
    return ok


def _grouped(*lists: Sequence[torch.Tensor]) -> list[list[list[torch.Tensor]]]:
    first = lists[0]
    for other in lists[1:]:
        if len(other) != len(first):
            raise ValueError(f"tensor lists must have equal lengths, got {len(first)} and {len(other)}")
    return [[[lst[i] for i in idx] for lst in lists] for idx in group_by_device_dtype(first).values()]


def penalty_grad_(
    grads: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    scale: float | torch.Tensor,
) -> None:
    """In place ``g ← g + scale·F·(θ − θ*)`` (the gradient of ``scale/2·Σ F(θ − θ*)²``), no autograd.

    Args:
        grads: tensors to update (e.g. the ``.grad`` of each parameter).
        params: ``θ``, shaped like ``grads``.
        anchors: ``θ*``, shaped like ``grads``.
        fishers: ``F``, shaped like ``grads``.
        scale: a float (e.g. λ) or a 0-dim tensor on the grads' device (e.g. λ times a loss scale).
    """
    for gs, ps, anc, fs in _grouped(grads, params, anchors, fishers):
        diff = torch._foreach_sub(ps, anc)
        if isinstance(scale, torch.Tensor):
            torch._foreach_mul_(diff, scale.to(gs[0].device))
            torch._foreach_addcmul_(gs, diff, fs)
        else:
            torch._foreach_addcmul_(gs, diff, fs, value=float(scale))


def penalty_value(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    *,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``Σ F·(θ − θ*)²`` over all tensors (no ½, no λ), accumulated in float32 or better.

    Args:
        params, anchors, fishers: equally long lists of equally shaped tensors.
        device: where the 0-dim result lives (default: the first param's device).

    Returns:
        0-dim tensor, dtype ``promote_types(float32, param dtype)``.
    """
    if not params:
        raise ValueError("params must not be empty")
    device = device or params[0].device
    acc_dtype = torch.promote_types(torch.float32, params[0].dtype)
    total = torch.zeros((), dtype=acc_dtype, device=device)
    for ps, anc, fs in _grouped(params, anchors, fishers):
        diff = torch._foreach_sub(ps, anc)
        weighted = torch._foreach_mul(diff, fs)
        torch._foreach_mul_(weighted, diff)
        sums = torch.stack([w.sum(dtype=acc_dtype) for w in weighted])
        total = total + sums.sum().to(device)
    return total


def constrain_(grads: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], lambda_: float) -> None:
    """In place ``g ← g / (1 + λ·F)`` (the EWC++ gradient constraint).

    Args:
        grads: tensors to scale.
        fishers: ``F``, shaped like ``grads``.
        lambda_: λ ≥ 0.
    """
    for gs, fs in _grouped(grads, fishers):
        denom = torch._foreach_mul(fs, float(lambda_))
        torch._foreach_add_(denom, 1.0)
        torch._foreach_div_(gs, denom)
