"""Sidecar duplicates: imohash of uploads, exact and near (CLIP) groups, resolution.

Real SQLite stores in tmp_path; near copies are constructed embeddings with known
cosines (a vector plus tiny noise, rotations by known angles)."""

from __future__ import annotations

import math
from pathlib import Path

import imohash
import numpy as np
import pytest

from immich_trt.sidecar.assets import AssetResults, asset_summary, save_results
from immich_trt.sidecar.duplicates import (
    check_exact,
    find_duplicates,
    imohash_of,
    list_groups,
    near_groups,
    resolve_group,
    unresolve_group,
)
from immich_trt.sidecar.errors import BadRequest, Conflict, NotFound
from immich_trt.sidecar.search import search_clip
from immich_trt.sidecar.service import Sidecar
from immich_trt.sidecar.store import Store
from immich_trt.sidecar.vectors import VectorIndex, normalise
from immich_trt.tools.testing import offline_settings

DIM = 512
CLIP = "ViT-B-32__openai"
rng = np.random.default_rng(7)


def unit(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


def rotated(degrees: float, base: int, towards: int) -> np.ndarray:
    """``unit(base)`` rotated by ``degrees`` towards ``unit(towards)``."""
    t = math.radians(degrees)
    return (math.cos(t) * unit(base) + math.sin(t) * unit(towards)).astype(np.float32)


def near_copy(v: np.ndarray) -> np.ndarray:
    """``v`` plus random noise of 2 % of its norm (cosine about 0.9998)."""
    noise = rng.standard_normal(DIM).astype(np.float32)
    return v + 0.02 * np.linalg.norm(v) * noise / np.linalg.norm(noise)


class Library:
    """A store with a CLIP index, filled the way ingestion does."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path)
        self.index = VectorIndex()

    def add(self, n: int, vector: np.ndarray | None = None, ref: str | None = None, width: int = 640,
            height: int = 480, size: int = 1000, recorded: bool = False) -> int:
        """Asset ``n`` (imohash ``n`` in hex) under ``ref`` (default ``asset-<n>``), or
        ``recorded`` without a ref (stored as ``imohash:<hex>``)."""
        results = AssetResults(
            imohash=f"{n:032x}", size=size, width=width, height=height,
            ref=None if recorded else ref or f"asset-{n}",
            clip=None if vector is None else (CLIP, vector),
        )
        saved = save_results(self.store, results)
        if saved.clip_added:
            self.index.add([saved.asset_id], vector[None])
        return saved.asset_id

    def find(self, threshold: float = 0.98) -> dict:
        return find_duplicates(self.store, {CLIP: self.index}, threshold)

    def groups(self, include_resolved: bool = False) -> list[dict]:
        return list_groups(self.store, limit=1000, include_resolved=include_resolved)["items"]

    def member_sets(self, kind: str | None = None) -> list[set[int]]:
        return sorted(({m["id"] for m in g["members"]} for g in self.groups() if kind in (None, g["kind"])), key=min)

    def outbox(self) -> dict[int, int]:
        rows = self.store.conn.execute("SELECT entity_id, version FROM outbox WHERE entity = 'asset'")
        return {row[0]: row[1] for row in rows}

    def hidden(self, asset: int) -> bool:
        return asset_summary(self.store, asset)["hidden"]


@pytest.fixture
def lib(tmp_path: Path):
    library = Library(tmp_path)
    yield library
    library.store.close()


# ---------------------------------------------------------------- imohash and exact check


@pytest.mark.parametrize("size", [0, 1000, 128 * 1024 - 1, 128 * 1024, 300_000])
def test_imohash_of_bytes_equals_imohash_of_the_file(tmp_path: Path, size: int) -> None:
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    digest = imohash_of(data)
    assert digest == imohash.hashfile(str(path), hexdigest=True)
    assert len(digest) == 32 and int(digest, 16) >= 0


def test_imohash_samples_large_files_and_reads_small_ones_whole() -> None:
    large = bytearray(rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    original = imohash_of(bytes(large))
    large[100_000] ^= 0xFF  # between the start and middle samples: not read
    assert imohash_of(bytes(large)) == original
    large[150_000] ^= 0xFF  # inside the middle sample
    assert imohash_of(bytes(large)) != original
    small = bytearray(b"x" * 5000)
    before = imohash_of(bytes(small))
    small[2500] = ord("y")
    assert imohash_of(bytes(small)) != before


def test_check_exact(lib: Library) -> None:
    asset = lib.add(1)
    digest = f"{1:032x}"
    assert check_exact(lib.store, digest) == {
        "imohash": digest, "duplicate": True, "asset": asset_summary(lib.store, asset)}
    assert check_exact(lib.store, "ABCDEF" + "0" * 26) == {"imohash": "abcdef" + "0" * 26, "duplicate": False,
                                                         "asset": None}
    for bad in ("", "0" * 31, "0" * 33, "g" * 32, " " + "0" * 31, None):
        with pytest.raises(BadRequest):
            check_exact(lib.store, bad)


# ---------------------------------------------------------------- finding groups


def test_exact_groups_are_assets_stored_under_several_refs(lib: Library) -> None:
    copied = lib.add(1, unit(0), ref="IMG_1.jpg")
    assert lib.add(1, unit(0), ref="IMG_1 (copy).jpg") == copied  # same bytes, second id
    recorded = lib.add(2, unit(5), recorded=True)  # recorded without an id: "imohash:<hex>"
    assert lib.add(2, unit(5), ref="IMG_2.jpg") == recorded
    lib.add(3, unit(9))
    assert lib.find() == {"groups": 1, "assets": 1, "threshold": 0.98}
    (group,) = lib.groups()
    assert group["kind"] == "exact" and group["suggestedKeeper"] == copied
    assert [(m["id"], sorted(m["refs"]), m["similarity"]) for m in group["members"]] == [
        (copied, ["IMG_1 (copy).jpg", "IMG_1.jpg"], 1.0)]
    assert sorted(asset_summary(lib.store, recorded)["refs"]) == ["IMG_2.jpg", f"imohash:{2:032x}"]


def test_near_copies_group_and_unrelated_assets_do_not(lib: Library) -> None:
    base = rng.standard_normal(DIM).astype(np.float32)
    a = lib.add(1, base)
    b = lib.add(2, near_copy(base) * 5.0)  # scale does not matter
    lib.add(3, rng.standard_normal(DIM).astype(np.float32))
    lib.add(4, rng.standard_normal(DIM).astype(np.float32))
    assert lib.find() == {"groups": 1, "assets": 2, "threshold": 0.98}
    (group,) = lib.groups()
    assert group["kind"] == "near" and {m["id"] for m in group["members"]} == {a, b}
    cosine = float(normalise(base) @ lib.index.get(b))
    assert cosine > 0.999
    assert [m["similarity"] for m in group["members"]] == pytest.approx([cosine, cosine], abs=1e-6)


def test_a_chain_of_near_copies_is_one_group_and_the_threshold_splits_it(lib: Library) -> None:
    a = lib.add(1, unit(0))
    b = lib.add(2, rotated(10, 0, 1))  # cos(10 deg) = 0.9848 to a and to c
    c = lib.add(3, rotated(20, 0, 1))  # cos(20 deg) = 0.9397 to a
    d = lib.add(4, rotated(3, 7, 8))
    e = lib.add(5, unit(7))  # cos(3 deg) = 0.9986 to d
    cos10 = math.cos(math.radians(10))
    assert lib.find(0.98) == {"groups": 2, "assets": 5, "threshold": 0.98}
    assert lib.member_sets() == [{a, b, c}, {d, e}]
    ids = [g["id"] for g in lib.groups()]
    chain = next(g for g in lib.groups() if a in {m["id"] for m in g["members"]})
    best = {m["id"]: m["similarity"] for m in chain["members"]}
    assert best == pytest.approx({a: cos10, b: cos10, c: cos10}, abs=1e-6)
    assert lib.find(0.93) == {"groups": 2, "assets": 5, "threshold": 0.93}  # now a~c too
    assert [g["id"] for g in lib.groups()] == ids  # same members, same group ids
    assert lib.find(0.99) == {"groups": 1, "assets": 2, "threshold": 0.99}  # the chain breaks
    assert lib.member_sets() == [{d, e}]
    assert lib.find(0.5) == {"groups": 2, "assets": 5, "threshold": 0.5}  # orthogonal groups stay apart
    assert lib.member_sets() == [{a, b, c}, {d, e}]


def test_threshold_one_groups_identical_embeddings_only(lib: Library) -> None:
    # an embedding whose float32 cosine to itself rounds below 1.0
    local = np.random.default_rng(3)
    for v in local.standard_normal((100, DIM)).astype(np.float32):
        rows = normalise(np.stack([v, v, v + 0.02 * np.linalg.norm(v) * normalise(local.standard_normal(DIM))]))
        if (rows @ rows.T)[0, 1] < 1.0:
            break
    a, b = lib.add(1, v), lib.add(2, v.copy())
    lib.add(3, rows[2])
    _, matrix = lib.index.snapshot()
    assert (matrix @ matrix.T)[0, 1] < 1.0  # the product find_duplicates computes
    assert lib.find(1.0) == {"groups": 1, "assets": 2, "threshold": 1.0}
    assert lib.member_sets() == [{a, b}]


@pytest.mark.parametrize("threshold", [0, 0.0, -0.5, 1.0001, 2, float("nan"), "high", None])
def test_find_duplicates_rejects_thresholds_outside_0_1(lib: Library, threshold) -> None:
    with pytest.raises(BadRequest):
        lib.find(threshold)


def test_near_groups_blocks_agree_with_the_full_matrix(monkeypatch) -> None:
    """Many blocks (BLOCK_CELLS forces one row per block at N=300) give the components
    and best cosines that the full similarity matrix gives."""
    from immich_trt.sidecar import duplicates

    local = np.random.default_rng(1)
    centres = normalise(local.standard_normal((40, 64)).astype(np.float32))
    rows = normalise(centres[local.integers(0, 40, 300)] + 0.045 * local.standard_normal((300, 64)).astype(np.float32))
    ids = np.arange(1000, 1300, dtype=np.int64)
    sims = rows @ rows.T
    np.fill_diagonal(sims, -np.inf)
    linked = sims >= 0.9
    # components by repeated reachability on the full matrix
    label = -np.ones(300, dtype=int)
    for start in range(300):
        if label[start] >= 0 or not linked[start].any():
            continue
        frontier = {start}
        while frontier:
            i = frontier.pop()
            label[i] = start
            frontier |= {int(j) for j in np.flatnonzero(linked[i]) if label[j] < 0}
    expected = sorted((set((ids[label == c]).tolist()) for c in set(label[label >= 0].tolist())), key=min)
    monkeypatch.setattr(duplicates, "BLOCK_CELLS", 300)
    groups = near_groups(ids, rows, 0.9)
    assert len(expected) > 3 and sum(map(len, expected)) < 300  # several groups, some singletons
    members = [sorted(g) for g in expected]
    assert any(not linked[np.ix_(np.array(g) - 1000, np.array(g) - 1000)][np.triu_indices(len(g), 1)].all()
               for g in members)  # some groups are chains: not every pair of members is linked
    assert sorted((set(g) for g in groups), key=min) == expected
    best = sims.max(axis=1)
    for group in groups:
        for asset, similarity in group.items():
            assert similarity == pytest.approx(float(best[asset - 1000]), abs=1e-5)


# ---------------------------------------------------------------- keeper, resolution


def test_suggested_keeper_is_largest_resolution_then_size_then_id(lib: Library) -> None:
    v, w = unit(0), unit(1)
    small = lib.add(1, v, width=100, height=100, size=9000)
    large = lib.add(2, near_copy(v), width=200, height=150, size=10)
    lib.add(3, near_copy(v), width=150, height=150, size=10_000)  # 22500 < 30000 pixels
    first = lib.add(4, w, width=50, height=50, size=100)
    bigger_file = lib.add(5, near_copy(w), width=50, height=50, size=200)
    lib.add(6, near_copy(w), width=50, height=50, size=100)  # ties with `first`, higher id
    lib.find()
    by_members = {frozenset(m["id"] for m in g["members"]): g for g in lib.groups()}
    assert len(by_members) == 2
    group_v = next(g for s, g in by_members.items() if small in s)
    group_w = next(g for s, g in by_members.items() if first in s)
    assert group_v["suggestedKeeper"] == large and group_v["members"][0]["id"] == large
    assert group_w["suggestedKeeper"] == bigger_file
    assert [m["id"] for m in group_w["members"]][1] == first  # equal pixels and size: lower id first
    assert all(g["keeper"] is None and g["resolved"] is False for g in lib.groups())


def test_resolve_hides_the_others_and_unresolve_restores_them(lib: Library) -> None:
    v = unit(0)
    small, large, other = lib.add(1, v, width=10, height=10), lib.add(2, near_copy(v)), lib.add(3, near_copy(v))
    lib.find()
    (group,) = lib.groups()
    before = lib.outbox()
    resolved = resolve_group(lib.store, group["id"])
    assert resolved["resolved"] is True and resolved["keeper"] == large == resolved["suggestedKeeper"]
    assert isinstance(resolved["resolvedAt"], float)
    assert [lib.hidden(a) for a in (small, large, other)] == [True, False, True]
    assert {m["id"]: m["hidden"] for m in resolved["members"]} == {small: True, large: False, other: True}
    assert all(lib.outbox()[a] == before[a] + 1 for a in (small, large, other))
    hits = search_clip(lib.store, {CLIP: lib.index}, v, CLIP)
    assert [h["assetId"] for h in hits] == [large]
    assert lib.groups() == [] and lib.groups(include_resolved=True) == [resolved]
    with pytest.raises(Conflict):
        resolve_group(lib.store, group["id"])

    restored = unresolve_group(lib.store, group["id"])
    assert restored["resolved"] is False and restored["keeper"] is None and restored["resolvedAt"] is None
    assert [lib.hidden(a) for a in (small, large, other)] == [False, False, False]
    assert all(lib.outbox()[a] == before[a] + 2 for a in (small, large, other))
    with pytest.raises(Conflict):
        unresolve_group(lib.store, group["id"])

    chosen = resolve_group(lib.store, group["id"], keep=small)
    assert chosen["keeper"] == small and [lib.hidden(a) for a in (small, large, other)] == [False, True, True]


def test_resolve_and_unresolve_reject_unknown_groups_and_foreign_keepers(lib: Library) -> None:
    v = unit(0)
    assets = [lib.add(1, v), lib.add(2, near_copy(v)), lib.add(3, unit(1))]
    lib.find()
    (group,) = lib.groups()
    with pytest.raises(BadRequest):
        resolve_group(lib.store, group["id"], keep=assets[2])
    assert not any(lib.hidden(a) for a in assets) and lib.groups()[0]["resolved"] is False
    for call in (resolve_group, unresolve_group):
        with pytest.raises(NotFound):
            call(lib.store, 999)


def test_hidden_assets_join_no_new_group(lib: Library) -> None:
    copied = lib.add(1, unit(0), ref="a.jpg", width=10, height=10)
    lib.add(1, unit(0), ref="b.jpg")
    keeper = lib.add(2, near_copy(unit(0)))
    lib.find()
    assert [(g["kind"], {m["id"] for m in g["members"]}) for g in lib.groups()] == [
        ("exact", {copied}), ("near", {copied, keeper})]
    near = lib.groups()[1]
    resolve_group(lib.store, near["id"])
    assert lib.hidden(copied)
    assert lib.find() == {"groups": 0, "assets": 0, "threshold": 0.98}  # the hidden copy leaves its exact group
    assert lib.groups(include_resolved=True)[0]["id"] == near["id"]


def test_resolving_an_exact_group_hides_nothing(lib: Library) -> None:
    asset = lib.add(1, unit(0), ref="a.jpg")
    lib.add(1, unit(0), ref="b.jpg")
    lib.find()
    (group,) = lib.groups()
    assert resolve_group(lib.store, group["id"])["keeper"] == asset
    assert not lib.hidden(asset)


def test_resolutions_survive_a_new_run(lib: Library) -> None:
    v, w = unit(0), unit(1)
    keeper, loser = lib.add(1, v, width=1000), lib.add(2, near_copy(v))
    p, q = lib.add(3, w), lib.add(4, near_copy(w))
    lib.find()
    groups = {min(m["id"] for m in g["members"]): g for g in lib.groups()}
    resolved = resolve_group(lib.store, groups[keeper]["id"])
    late = lib.add(5, near_copy(v))  # a new near copy of the resolved pair
    versions = lib.outbox()

    assert lib.find() == {"groups": 1, "assets": 2, "threshold": 0.98}
    assert lib.groups(include_resolved=True) == [resolved, groups[p]]  # same ids, same state
    assert lib.hidden(loser) and not lib.hidden(keeper)
    assert late not in {m["id"] for g in lib.groups() for m in g["members"]}
    assert lib.outbox() == versions  # nothing changed, no notice

    lib.find(0.999999)  # the {p, q} group dissolves: its members get a notice
    assert lib.groups() == [] and lib.groups(include_resolved=True) == [resolved]
    changed = lib.outbox()
    assert {a for a in changed if changed[a] != versions.get(a)} == {p, q}

    unresolve_group(lib.store, resolved["id"])
    lib.find()
    assert lib.member_sets() == [{keeper, loser, late}, {p, q}]


def test_list_groups_pages(lib: Library) -> None:
    assets = [lib.add(2 * i, unit(i)) for i in range(5)] + [lib.add(2 * i + 1, near_copy(unit(i))) for i in range(5)]
    lib.find()
    first = list_groups(lib.store, offset=0, limit=2)
    rest = list_groups(lib.store, offset=2, limit=10)
    assert first["total"] == rest["total"] == 5
    ids = [g["id"] for g in first["items"] + rest["items"]]
    assert len(ids) == 5 and ids == sorted(ids)
    assert sorted(m["id"] for g in first["items"] + rest["items"] for m in g["members"]) == sorted(assets)
    for offset, limit in ((-1, 10), (0, 0), (0, 1001)):
        with pytest.raises(BadRequest):
            list_groups(lib.store, offset, limit)


async def test_find_duplicates_through_the_sidecar(tmp_path: Path) -> None:
    sidecar = Sidecar(offline_settings(tmp_path))
    await sidecar.start()
    try:
        v = rng.standard_normal(DIM).astype(np.float32)
        ids = []
        for n, vector in enumerate((v, near_copy(v), rng.standard_normal(DIM).astype(np.float32))):
            saved = await sidecar.save(AssetResults(f"{n:032x}", 100, 64, 64, ref=f"a{n}", clip=(CLIP, vector)))
            ids.append(saved.asset_id)
        assert await sidecar.call(find_duplicates, sidecar.clip) == {"groups": 1, "assets": 2, "threshold": 0.98}
        page = await sidecar.call(list_groups)
        assert page["total"] == 1 and {m["id"] for m in page["items"][0]["members"]} == set(ids[:2])
        group = await sidecar.call(resolve_group, page["items"][0]["id"], ids[1])
        assert group["keeper"] == ids[1]
        assert (await sidecar.call(check_exact, f"{0:032x}"))["asset"]["hidden"] is True
    finally:
        await sidecar.stop()
