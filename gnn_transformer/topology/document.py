"""Packed sequences: several documents in one sequence, attention kept inside each document.

Training pipelines pack short documents into one long row; attention must not cross document
boundaries, which makes the mask block-diagonal (causal inside each block for a decoder). As a
graph this is simply the disjoint union of the documents.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Literal, overload

from torch_geometric import EdgeIndex

from ._common import Lengths, as_lengths, check_bool, check_edges, check_int
from .basic import causal as _causal
from .basic import full as _full
from .implicit import BlockGraph, implicit_window

DocLengths = int | Sequence[int] | Sequence[Sequence[int]]


def _documents(length: int, docs: object, where: str) -> list[int]:
    """Document lengths of one packed sequence: ``docs`` one document length or a list of them."""
    if isinstance(docs, int) and not isinstance(docs, bool):
        check_int("doc_lengths", docs, 1)
        return [docs] * (length // docs) + ([length % docs] if length % docs else [])
    if isinstance(docs, (str, bytes)) or not isinstance(docs, Sequence):
        raise ValueError(f"Expected 'doc_lengths'{where} to be an int or a list of ints (got {docs!r})")
    out = as_lengths(list(docs), "doc_lengths")
    if sum(out) != length:
        raise ValueError(
            f"Expected 'doc_lengths'{where} to sum to the sequence length {length} (got {out}, sum {sum(out)})"
        )
    return [d for d in out if d > 0]


def document_lengths(n: Lengths, doc_lengths: DocLengths) -> list[int]:
    """Flat list of document lengths of a (batch of) packed sequence(s)."""
    lengths = as_lengths(n)
    per_seq: list[object]  # per sequence: a document length or a list of them
    if isinstance(doc_lengths, int) and not isinstance(doc_lengths, bool):
        check_int("doc_lengths", doc_lengths, 1)  # also for an empty batch
        per_seq = [doc_lengths] * len(lengths)
    elif isinstance(doc_lengths, Sequence) and not isinstance(doc_lengths, (str, bytes)):
        nested = len(doc_lengths) > 0 and all(isinstance(d, Sequence) for d in doc_lengths)
        if isinstance(n, int) and not nested:
            per_seq = [doc_lengths]
        elif nested and len(doc_lengths) == len(lengths):
            per_seq = list(doc_lengths)
        else:
            raise ValueError(
                f"Expected 'doc_lengths' to be an int, a list of ints (one sequence) or "
                f"one list per sequence ({len(lengths)}) (got {doc_lengths!r})"
            )
    else:
        raise ValueError(f"Expected 'doc_lengths' to be an int or a list (got {doc_lengths!r})")
    flat: list[int] = []
    for b, (L, docs) in enumerate(zip(lengths, per_seq)):
        flat += _documents(L, docs, f" of sequence {b}" if len(lengths) > 1 else "")
    return flat


@overload
def document(
    n: Lengths,
    doc_lengths: DocLengths,
    *,
    causal: bool = ...,
    implicit: Literal[False] = ...,
    block_size: int | None = ...,
) -> EdgeIndex: ...
@overload
def document(
    n: Lengths, doc_lengths: DocLengths, *, causal: bool = ..., implicit: Literal[True], block_size: int | None = ...
) -> BlockGraph: ...
@overload
def document(
    n: Lengths, doc_lengths: DocLengths, *, causal: bool = ..., implicit: bool, block_size: int | None = ...
) -> EdgeIndex | BlockGraph: ...


def document(
    n: Lengths, doc_lengths: DocLengths, *, causal: bool = False, implicit: bool = False, block_size: int | None = None
) -> EdgeIndex | BlockGraph:
    r"""Block-diagonal attention over packed documents: ``j -> i`` iff same document (and
    ``j <= i`` when ``causal``).

    Edges: :math:`\sum_d \ell_d^2` (causal: :math:`\sum_d \ell_d (\ell_d + 1) / 2`) over document
    lengths :math:`\ell_d`.

    Args:
        n: packed sequence length, or a list of lengths (a batch of packed rows).
        doc_lengths: an int (documents of that length, the last one shorter), or the document
            lengths of the sequence, or one such list per sequence of the batch.
        causal: causal attention inside each document.
        implicit: return the graph as a :class:`~gnn_transformer.topology.BlockGraph` (tiles the
            kernels read without an edge list; its ``edges()`` are this builder's edges).
        block_size: tile side of the implicit graph (default 64, less for fewer tokens).

    Example:
        >>> document(3, [2, 1]).tolist()
        [[0, 1, 0, 1, 2], [0, 0, 1, 1, 2]]
    """
    check_bool("causal", causal)
    if check_bool("implicit", implicit):
        return implicit_window(document_lengths(n, doc_lengths), None, causal, block_size, "document", "documents")

    def edges(d: int) -> int:  # one document of d tokens
        return d * (d + 1) // 2 if causal else d * d

    if isinstance(doc_lengths, int) and not isinstance(doc_lengths, bool):  # count before listing them
        lengths = as_lengths(n)
        check_int("doc_lengths", doc_lengths, 1)
        check_edges(
            "document", sum(L // doc_lengths * edges(doc_lengths) + edges(L % doc_lengths) for L in lengths), n=lengths
        )
    flat = document_lengths(n, doc_lengths)
    check_edges("document", sum(edges(d) for d in flat), n=as_lengths(n))
    return _causal(flat) if causal else _full(flat)


def document_predicate(i: int, j: int, *, doc_lengths: int | Sequence[int], causal: bool = False) -> bool:
    """Predicate twin of :func:`document` on one packed sequence."""
    if causal and j > i:
        return False
    if isinstance(doc_lengths, int):
        return i // doc_lengths == j // doc_lengths
    ends = list(accumulate(doc_lengths))
    return bisect_right(ends, i) == bisect_right(ends, j)
