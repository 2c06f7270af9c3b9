"""Scoring and compressing retrieval vectors, client side (numpy; scipy for token pooling).

- :func:`maxsim`: late-interaction (ColBERT / ColQwen2.5) scores of one query against many
  documents, vectorised: ``score(d) = sum over query tokens of max over document tokens of q . d``.
- :func:`pool_tokens`: hierarchical token pooling of a multi-vector embedding (colpali-engine's
  ``HierarchicalTokenPooler``: Ward clustering on cosine distances, cluster means L2-normalised),
  dividing storage by about ``pool_factor``.
- :func:`storage_bytes`: what a set of embeddings costs to store.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["maxsim", "pool_tokens", "storage_bytes"]

Vectors = npt.NDArray[np.floating]


def maxsim(query: npt.ArrayLike, documents: Sequence[npt.ArrayLike]) -> npt.NDArray[np.float32]:
    """MaxSim scores ``[len(documents)]`` of ``query`` ``[Tq, E]`` against documents ``[Td_i, E]``.

    Documents of different lengths are padded once into ``[N, Tmax, E]``; padded rows never win
    the max. Rows that are all zero (masked by the model, e.g. ColQwen2.5's image-tokens-only
    documents) score 0 like in the reference.
    """
    q = np.asarray(query, dtype=np.float32)
    if q.ndim != 2:
        raise ValueError(f"query must be [Tq, E], got shape {q.shape}")
    if not documents:
        return np.zeros(0, dtype=np.float32)
    docs = [np.asarray(d, dtype=np.float32) for d in documents]
    lengths = np.array([d.shape[0] for d in docs])
    padded = np.zeros((len(docs), int(lengths.max()), q.shape[1]), dtype=np.float32)
    for index, d in enumerate(docs):
        if d.ndim != 2 or d.shape[1] != q.shape[1]:
            raise ValueError(f"document {index} must be [Td, {q.shape[1]}], got shape {d.shape}")
        padded[index, : d.shape[0]] = d
    similarities = np.einsum("qe,nte->nqt", q, padded)  # [N, Tq, Tmax]
    valid = np.arange(padded.shape[1])[None, :] < lengths[:, None]  # [N, Tmax]
    similarities = np.where(valid[:, None, :], similarities, -np.inf)
    scores: npt.NDArray[np.float32] = similarities.max(axis=2).sum(axis=1).astype(np.float32)
    return scores


def pool_tokens(vectors: npt.ArrayLike, pool_factor: int) -> npt.NDArray[np.float32]:
    """``[T, E]`` -> ``[<= max(T // pool_factor, 1), E]`` by hierarchical clustering (Ward), each
    cluster replaced by its L2-normalised mean, as colpali-engine's ``HierarchicalTokenPooler``.

    Needs scipy (``pip install scipy``). ``pool_factor`` 1 returns the vectors unchanged.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] < 2:
        raise ValueError(f"vectors must be [T >= 2, E], got shape {v.shape}")
    if pool_factor < 1:
        raise ValueError(f"pool_factor must be at least 1, got {pool_factor}")
    if pool_factor == 1:
        return v
    # As the reference: the rows of the cosine-distance matrix are the observations clustered.
    distances = 1 - v @ v.T
    tree = linkage(distances, metric="euclidean", method="ward")
    clusters = max(v.shape[0] // pool_factor, 1)
    labels = fcluster(tree, t=clusters, criterion="maxclust") - 1
    pooled = []
    for cluster in range(clusters):
        members = v[labels == cluster]
        if len(members):
            mean = members.mean(axis=0)
            pooled.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return np.stack(pooled).astype(np.float32)


def storage_bytes(embeddings: Sequence[npt.ArrayLike]) -> int:
    """Bytes the arrays occupy (their own dtype), e.g. before and after :func:`pool_tokens`."""
    return int(sum(np.asarray(e).nbytes for e in embeddings))
