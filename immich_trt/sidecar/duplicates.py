"""Duplicate detection: exact (imohash) and near (CLIP cosine) duplicate groups.

Exact duplicates: the store keeps one ``assets`` row per distinct content (imohash), so
byte-identical files under several ids are one asset with several ``asset_refs``. An
asset with two or more caller refs (refs other than the synthetic ``imohash:<hex>`` one
given to results recorded without an id) forms an ``exact`` group of that one asset;
its summary's ``refs`` lists the copies. Resolving it records the choice and hides
nothing (there is no other asset to hide).

Near duplicates: assets whose CLIP embeddings (same model) have cosine similarity >=
``threshold`` are linked, and the connected components (union-find) of two or more
assets are ``near`` groups; so A~B and B~C put A, B, C in one group even when A and C
are below the threshold. A member's ``similarity`` is its best cosine to another member.

Groups live in ``duplicate_groups`` / ``duplicate_members``. :func:`find_duplicates`
replaces the unresolved groups and keeps resolved ones as they are: members of a
resolved group of a kind, and hidden assets, are not put into new groups of that kind,
so a resolution survives later runs (and a new near copy of a kept asset only groups
with other unresolved assets). A new group with the same kind and members as an
unresolved group of the previous run keeps that group's id.

:func:`resolve_group` keeps one member and hides the others (``assets.hidden = 1``:
left out of search and of clustering's core points); :func:`unresolve_group` undoes it.
"""

from __future__ import annotations

import io
import re
import time
from typing import Any

import numpy as np
from imohash import hashfileobject

from .assets import asset_summaries
from .errors import BadRequest, Conflict, NotFound
from .search import check_k, check_offset, check_range
from .store import Store
from .vectors import VectorIndex

#: Pairs with cosine >= threshold - SIMILARITY_TOLERANCE count as linked, so identical
#: embeddings (float32 cosine 0.99999994) still link at threshold 1.0.
SIMILARITY_TOLERANCE = 1e-6
#: Cells of one similarity block (rows x columns), 16 Mi float32 = 64 MiB.
BLOCK_CELLS = 1 << 24

_IMOHASH = re.compile(r"[0-9a-f]{32}")


def imohash_of(data: bytes) -> str:
    """imohash 1.1 hex digest (32 chars) of ``data`` with the default sample parameters
    (whole content under 128 KiB, else 3 samples of 16 KiB: start, middle, end, plus the
    size), as ``imohash.hashfile`` gives for a file holding ``data``."""
    return hashfileobject(io.BytesIO(data), hexdigest=True)


def check_exact(store: Store, imohash: str) -> dict[str, Any]:
    """Whether content with imohash ``imohash`` (32 hex chars, any case) is stored.

    Returns ``{"imohash" (lower case), "duplicate": bool, "asset": summary or None}``.
    Raises :class:`BadRequest` for anything but 32 hex characters."""
    value = imohash.lower() if isinstance(imohash, str) else ""
    if not _IMOHASH.fullmatch(value):
        raise BadRequest(f"imohash must be 32 hexadecimal characters, got {imohash!r}")
    row = store.conn.execute("SELECT id FROM assets WHERE imohash = ?", (value,)).fetchone()
    asset = None if row is None else asset_summaries(store, [row[0]])[row[0]]
    return {"imohash": value, "duplicate": asset is not None, "asset": asset}


# ---------------------------------------------------------------- finding


class _UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def near_groups(ids: np.ndarray, matrix: np.ndarray, threshold: float) -> list[dict[int, float]]:
    """Connected components of the graph "cosine >= threshold" over unit rows.

    ``ids`` int[N], ``matrix`` float32[N, D] L2-normalised. Computed blockwise: rows
    ``[s, s + B)`` against rows ``[s, N)`` in one product, ``B = max(1, 2**24 // N)``,
    so memory stays under 64 MiB of similarities while the work is ``N^2 / 2 * D``
    multiply-adds (N = 100 000, D = 512: 2.6e12, minutes on a few cores); each linked
    pair then costs one union. Returns ``[{asset id: best cosine to another member}]``
    for components of two or more, each ordered by id."""
    n = len(ids)
    if n < 2:
        return []
    sets = _UnionFind(n)
    best = np.full(n, -np.inf, dtype=np.float32)
    block = max(1, BLOCK_CELLS // n)
    for start in range(0, n, block):
        sims = matrix[start : start + block] @ matrix[start:].T  # [b, n - start]
        rows, cols = np.nonzero(np.triu(sims >= threshold - SIMILARITY_TOLERANCE, k=1))
        values = sims[rows, cols]
        rows, cols = rows + start, cols + start
        np.maximum.at(best, rows, values)
        np.maximum.at(best, cols, values)
        for a, b in zip(rows.tolist(), cols.tolist()):
            sets.union(a, b)
    components: dict[int, dict[int, float]] = {}
    for i in np.flatnonzero(np.isfinite(best)).tolist():
        components.setdefault(sets.find(i), {})[int(ids[i])] = min(1.0, float(best[i]))
    return [dict(sorted(members.items())) for members in components.values()]


def _excluded(store: Store, kind: str) -> set[int]:
    """Assets that new groups of ``kind`` must not take: members of resolved groups of
    that kind, and hidden assets."""
    rows = store.conn.execute(
        "SELECT m.asset FROM duplicate_members m JOIN duplicate_groups g ON g.id = m.grp "
        "WHERE g.resolved_at IS NOT NULL AND g.kind = ? UNION SELECT id FROM assets WHERE hidden = 1",
        (kind,),
    )
    return {row[0] for row in rows}


def _memberships(store: Store) -> dict[int, set[tuple[int, float]]]:
    """``{asset: {(group id, similarity)}}`` over all groups (the mirror's view)."""
    out: dict[int, set[tuple[int, float]]] = {}
    for grp, asset, similarity in store.conn.execute("SELECT grp, asset, similarity FROM duplicate_members"):
        out.setdefault(asset, set()).add((grp, similarity))
    return out


def find_duplicates(store: Store, clip_indices: dict[str, VectorIndex], threshold: float = 0.98) -> dict[str, Any]:
    """Recompute the unresolved duplicate groups (see the module docstring).

    ``clip_indices`` is ``{model: VectorIndex}`` of asset CLIP embeddings; near groups
    are found per model over a snapshot of each index with :func:`near_groups` (cost
    there). Every asset whose group ids or member similarity changed gets an ``asset``
    outbox notice. Returns ``{"groups": unresolved groups now, "assets": assets in them,
    "threshold": threshold}``. Raises :class:`BadRequest` for a threshold outside
    ``(0, 1]``."""
    threshold = check_range(threshold, "threshold", 0.0, 1.0, low_open=True)
    found: list[tuple[str, dict[int, float]]] = []

    excluded = _excluded(store, "exact")
    for (asset,) in store.conn.execute(
        "SELECT asset FROM asset_refs WHERE substr(ref, 1, 8) != 'imohash:' GROUP BY asset HAVING count(*) >= 2 "
        "ORDER BY asset"
    ):
        if asset not in excluded:
            found.append(("exact", {asset: 1.0}))

    excluded = np.fromiter(_excluded(store, "near"), dtype=np.int64)
    existing = np.fromiter((row[0] for row in store.conn.execute("SELECT id FROM assets")), dtype=np.int64)
    for model in sorted(clip_indices):
        ids, matrix = clip_indices[model].snapshot()
        keep = np.isin(ids, existing) & ~np.isin(ids, excluded)
        found.extend(("near", members) for members in near_groups(ids[keep], matrix[keep], threshold))

    now = time.time()
    with store.transaction() as conn:
        before = _memberships(store)
        previous: dict[tuple[str, frozenset[int]], int] = {}
        for grp, kind in conn.execute("SELECT id, kind FROM duplicate_groups WHERE resolved_at IS NULL").fetchall():
            members = frozenset(r[0] for r in conn.execute("SELECT asset FROM duplicate_members WHERE grp = ?", (grp,)))
            previous[(kind, members)] = grp
        reused = set()
        for kind, members in found:
            grp = previous.get((kind, frozenset(members)))
            if grp is None:
                grp = conn.execute(
                    "INSERT INTO duplicate_groups (kind, created_at) VALUES (?, ?)", (kind, now)
                ).lastrowid
            reused.add(grp)
            conn.executemany(
                "INSERT INTO duplicate_members (grp, asset, similarity) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, asset) DO UPDATE SET similarity = excluded.similarity",
                [(grp, asset, similarity) for asset, similarity in members.items()],
            )
        stale = [grp for grp in previous.values() if grp not in reused]
        conn.executemany("DELETE FROM duplicate_groups WHERE id = ?", [(grp,) for grp in stale])
        after = _memberships(store)
        changed = sorted(a for a in set(before) | set(after) if before.get(a) != after.get(a))
        if changed:
            store.touch("asset", *changed)
    return {"groups": len(found), "assets": sum(len(m) for _, m in found), "threshold": threshold}


# ---------------------------------------------------------------- listing and resolving


def _keeper_rank(summary: dict[str, Any]) -> tuple[int, int, int]:
    """Sort key of the suggested keeper: largest resolution (width * height, pixels),
    then larger file (bytes), then lowest id."""
    return (-summary["width"] * summary["height"], -summary["size"], summary["id"])


def _group_dicts(store: Store, rows: list[Any]) -> list[dict[str, Any]]:
    """Group rows (id, kind, keeper, resolved_at, created_at) as returned by the API."""
    if not rows:
        return []
    marks = ",".join("?" * len(rows))
    members: dict[int, dict[int, float]] = {}
    for grp, asset, similarity in store.conn.execute(
        f"SELECT grp, asset, similarity FROM duplicate_members WHERE grp IN ({marks})", [r["id"] for r in rows]
    ):
        members.setdefault(grp, {})[asset] = similarity
    summaries = asset_summaries(store, [a for group in members.values() for a in group])
    out = []
    for row in rows:
        listed = sorted(
            ({**summaries[a], "similarity": s} for a, s in members.get(row["id"], {}).items() if a in summaries),
            key=_keeper_rank,
        )
        out.append(
            {
                "id": row["id"],
                "kind": row["kind"],
                "resolved": row["resolved_at"] is not None,
                "resolvedAt": row["resolved_at"],
                "createdAt": row["created_at"],
                "keeper": row["keeper"],
                "suggestedKeeper": listed[0]["id"] if listed else None,
                "members": listed,
            }
        )
    return out


_GROUP_COLUMNS = "id, kind, keeper, resolved_at, created_at"


def get_group(store: Store, group_id: int) -> dict[str, Any]:
    """One group as :func:`list_groups` items. Raises :class:`NotFound`."""
    row = store.conn.execute(f"SELECT {_GROUP_COLUMNS} FROM duplicate_groups WHERE id = ?", (int(group_id),)).fetchone()
    if row is None:
        raise NotFound(f"duplicate group {group_id} not found")
    return _group_dicts(store, [row])[0]


def list_groups(
    store: Store,
    offset: int = 0,
    limit: int = 50,
    include_resolved: bool = False,
    kind: str | None = None,
    asset_id: int | None = None,
) -> dict[str, Any]:
    """A page of duplicate groups, by id; only groups of ``kind`` ('exact' | 'near')
    and only groups holding asset ``asset_id`` when given.

    Returns ``{"total", "items": [{"id", "kind": "exact" | "near", "resolved": bool,
    "resolvedAt" / "createdAt" (unix seconds or None), "keeper": asset id or None,
    "suggestedKeeper": asset id, "members": [summary + "similarity"]}]}``; members are
    ordered as keeper candidates (largest width * height, then larger size in bytes,
    then lowest id), so ``suggestedKeeper`` is the first. Raises :class:`BadRequest` for
    a negative offset, a limit outside 1..1000 or an unknown kind."""
    offset, limit = check_offset(offset), check_k(limit, "limit")
    conditions, args = [], []
    if not include_resolved:
        conditions.append("resolved_at IS NULL")
    if kind is not None:
        if kind not in ("exact", "near"):
            raise BadRequest(f"kind must be 'exact' or 'near', got {kind!r}")
        conditions.append("kind = ?")
        args.append(kind)
    if asset_id is not None:
        conditions.append("id IN (SELECT grp FROM duplicate_members WHERE asset = ?)")
        args.append(int(asset_id))
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    total = store.conn.execute(f"SELECT count(*) FROM duplicate_groups{where}", args).fetchone()[0]
    rows = store.conn.execute(
        f"SELECT {_GROUP_COLUMNS} FROM duplicate_groups{where} ORDER BY id LIMIT ? OFFSET ?", (*args, limit, offset)
    ).fetchall()
    return {"total": total, "items": _group_dicts(store, rows)}


def resolve_group(store: Store, group_id: int, keep: int | None = None) -> dict[str, Any]:
    """Keep asset ``keep`` of the group (default: the suggested keeper), hide the other
    members (``assets.hidden = 1``) and mark the group resolved; the members get
    ``asset`` outbox notices. Returns the group (as :func:`list_groups` items).

    Raises :class:`NotFound` for an unknown group, :class:`Conflict` for a resolved one,
    :class:`BadRequest` when ``keep`` is not a member."""
    now = time.time()
    with store.transaction() as conn:
        group = get_group(store, group_id)
        if group["resolved"]:
            raise Conflict(f"duplicate group {group_id} is already resolved")
        members = [m["id"] for m in group["members"]]
        keeper = group["suggestedKeeper"] if keep is None else keep
        if keeper not in members:
            raise BadRequest(f"asset {keep} is not a member of duplicate group {group_id}")
        others = [(now, a) for a in members if a != keeper]
        conn.executemany("UPDATE assets SET hidden = 1, updated_at = ? WHERE id = ?", others)
        conn.execute("UPDATE duplicate_groups SET keeper = ?, resolved_at = ? WHERE id = ?", (keeper, now, group["id"]))
        store.touch("asset", *members)
        return get_group(store, group_id)


def unresolve_group(store: Store, group_id: int) -> dict[str, Any]:
    """Undo :func:`resolve_group`: un-hide the members it hid, clear keeper and
    resolution time; the members get ``asset`` outbox notices. Returns the group.

    The members it hid are the members other than the keeper: only resolutions hide
    assets, an exact group's only member is its keeper, and a hidden asset never joins
    a new group, so a hidden asset is a non-keeper member of exactly one resolved group.

    Raises :class:`NotFound` for an unknown group, :class:`Conflict` for an unresolved
    one."""
    now = time.time()
    with store.transaction() as conn:
        group = get_group(store, group_id)
        if not group["resolved"]:
            raise Conflict(f"duplicate group {group_id} is not resolved")
        members = [m["id"] for m in group["members"]]
        restore = [(now, a) for a in members if a != group["keeper"]]
        conn.executemany("UPDATE assets SET hidden = 0, updated_at = ? WHERE id = ? AND hidden = 1", restore)
        conn.execute("UPDATE duplicate_groups SET keeper = NULL, resolved_at = NULL WHERE id = ?", (group["id"],))
        store.touch("asset", *members)
        return get_group(store, group_id)
