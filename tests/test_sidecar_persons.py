"""Face clustering (Immich's incremental DBSCAN) and person management on a real store.

Embeddings are constructed with known identities: a face is its identity's random unit
centre plus noise (cosine to the centre about 0.85, to another face of the identity
about 0.72, to other identities about 0), strangers are random unit vectors.
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from immich_trt.sidecar.assets import AssetResults, FaceResult, save_results
from immich_trt.sidecar.errors import BadRequest, NotFound
from immich_trt.sidecar.persons import (
    assign_face,
    cluster_faces,
    delete_person,
    get_person,
    list_persons,
    merge_persons,
    name_person,
    person_thumbnail,
    split_person,
    unassigned_faces,
)
from immich_trt.sidecar.service import Sidecar
from immich_trt.sidecar.store import Store
from immich_trt.sidecar.vectors import normalise
from immich_trt.tools.testing import offline_settings

DIM = 512
MODEL = "buffalo_l"
NOISE = 0.62  # norm of the noise added to a unit centre: cos to the centre 1/sqrt(1 + 0.62**2) ~ 0.85


class Faces:
    """A store plus constructed face embeddings; remembers each face's identity."""

    def __init__(self, tmp_path, seed: int = 0) -> None:
        self.tmp_path = tmp_path
        self.store = Store(tmp_path / "data")
        self.rng = np.random.default_rng(seed)
        self.centres: dict[str, np.ndarray] = {}
        self.identity: dict[int, str] = {}
        self.counter = itertools.count()

    def centre(self, identity: str) -> np.ndarray:
        if identity not in self.centres:
            self.centres[identity] = normalise(self.rng.standard_normal(DIM))
        return self.centres[identity]

    def embedding(self, identity: str) -> np.ndarray:
        if identity.startswith("stranger"):
            return normalise(self.rng.standard_normal(DIM))
        noise = self.rng.standard_normal(DIM)
        return normalise(self.centre(identity) + NOISE * noise / np.linalg.norm(noise))

    def add(self, identity: str, count: int = 1, model: str = MODEL, hidden: bool = False,
            thumbnail: bytes | None = None, score: float = 0.9, embedding: np.ndarray | None = None) -> list[int]:
        """``count`` assets with one face each; returns the face ids."""
        ids = []
        for _ in range(count):
            n = next(self.counter)
            vector = self.embedding(identity) if embedding is None else embedding
            face = FaceResult((10.0, 20.0, 110.0, 140.0), score, vector.astype(np.float32), thumbnail=thumbnail)
            saved = save_results(self.store, AssetResults(f"{n:032x}", 1000 + n, 640, 480, ref=f"asset-{n}",
                                                          faces=(model, [face])))
            if hidden:
                self.store.conn.execute("UPDATE assets SET hidden = 1 WHERE id = ?", (saved.asset_id,))
            ids += saved.face_ids
            self.identity.update({f: identity for f in saved.face_ids})
        return ids

    def indices(self):
        """Face indices built the way the sidecar builds them on start."""
        sidecar = Sidecar(offline_settings(self.tmp_path))
        sidecar.load_indices(self.store)
        return sidecar.faces

    def cluster(self, **kwargs) -> dict:
        return cluster_faces(self.store, self.indices(), **kwargs)

    def person_of(self) -> dict[int, int | None]:
        return {r[0]: r[1] for r in self.store.conn.execute("SELECT id, person FROM faces")}

    def groups(self) -> dict[int, set[str]]:
        """``{person: {identities of its faces}}``."""
        out: dict[int, set[str]] = {}
        for face, person in self.person_of().items():
            if person is not None:
                out.setdefault(person, set()).add(self.identity[face])
        return out

    def outbox(self, entity: str) -> set[int]:
        return {r[0] for r in self.store.conn.execute("SELECT entity_id FROM outbox WHERE entity = ?", (entity,))}

    def clear_outbox(self) -> None:
        self.store.conn.execute("DELETE FROM outbox")

    def persons(self) -> set[int]:
        return {r[0] for r in self.store.conn.execute("SELECT id FROM persons")}


def five_identities(faces: Faces) -> dict[str, list[int]]:
    members = {f"id{i}": faces.add(f"id{i}", 6) for i in range(5)}
    members["strangers"] = [faces.add(f"stranger{i}")[0] for i in range(4)]
    return members


def person_for(faces: Faces, face_ids: list[int]) -> int:
    persons = {faces.person_of()[f] for f in face_ids}
    assert len(persons) == 1 and None not in persons, persons
    return persons.pop()


def assert_representatives_valid(faces: Faces) -> None:
    for person, representative in faces.store.conn.execute("SELECT id, representative_face FROM persons"):
        count = faces.store.conn.execute("SELECT count(*) FROM faces WHERE person = ?", (person,)).fetchone()[0]
        if count:
            assert faces.person_of()[representative] == person
        else:
            assert representative is None


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_constructed_embeddings_have_the_intended_geometry(tmp_path):
    faces = Faces(tmp_path)
    a, b = np.stack([faces.embedding("a") for _ in range(6)]), faces.embedding("b")
    own = a @ faces.centre("a")
    pairs = (a @ a.T)[np.triu_indices(6, 1)]
    assert own.min() > 0.8 and own.max() < 0.9
    assert pairs.min() > 0.6  # cosine distance < 0.4 within an identity
    assert np.abs(a @ b).max() < 0.25  # distance > 0.75 across identities


def test_first_run_finds_each_identity_once(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.clear_outbox()
    counts = faces.cluster()
    assert counts == {"processed": 34, "assigned": 30, "newPersons": 5, "deferred": 0, "unassigned": 4,
                      "removedPersons": 0}
    groups = faces.groups()
    assert len(groups) == 5 and all(len(ids) == 1 for ids in groups.values())
    persons = {person_for(faces, members[f"id{i}"]) for i in range(5)}
    assert len(persons) == 5
    assert all(faces.person_of()[f] is None for f in members["strangers"])
    assigned = {r[0] for r in faces.store.conn.execute("SELECT assigned FROM faces WHERE person IS NOT NULL")}
    assert assigned == {"auto"}
    assert faces.store.conn.execute("SELECT count(*) FROM faces WHERE clustered = 0").fetchone()[0] == 0
    assert faces.outbox("person") == persons
    assert faces.outbox("face") == {f for i in range(5) for f in members[f"id{i}"]}
    assert_representatives_valid(faces)
    # each person's representative is the face that founded it: the lowest id of its identity
    for i in range(5):
        person = get_person(faces.store, person_for(faces, members[f"id{i}"]))
        assert person["representativeFaceId"] == min(members[f"id{i}"])
        assert person["faceCount"] == 6 and person["assetCount"] == 6


def test_incremental_run_adds_new_faces_to_existing_person(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.cluster()
    before = faces.persons()
    new = faces.add("id2", 3)
    faces.clear_outbox()
    counts = faces.cluster()
    assert counts["processed"] == 3  # clustered faces, strangers included, are not retried
    assert counts["assigned"] == 3 and counts["newPersons"] == 0
    assert faces.persons() == before
    assert person_for(faces, members["id2"] + new) == person_for(faces, members["id2"])
    assert faces.outbox("face") == set(new)
    assert faces.outbox("person") == {person_for(faces, new)}
    assert all(faces.person_of()[f] is None for f in members["strangers"])


def test_new_identity_in_a_later_run_gets_a_person(tmp_path):
    faces = Faces(tmp_path)
    five_identities(faces)
    faces.cluster()
    before = faces.persons()
    newcomer = faces.add("id5", 4)
    counts = faces.cluster()
    assert counts == {"processed": 4, "assigned": 4, "newPersons": 1, "deferred": 0, "unassigned": 0,
                      "removedPersons": 0}
    person = person_for(faces, newcomer)
    assert person not in before and faces.persons() == before | {person}
    assert all(len(ids) == 1 for ids in faces.groups().values())


def test_deferred_non_core_face_joins_the_nearby_person(tmp_path):
    faces = Faces(tmp_path)
    members = {"a": faces.add("a", 5)}
    vectors = np.stack([faces.indices()[MODEL].get(f) for f in members["a"]])
    # a face at cosine 0.55 from the first face of "a" and orthogonal to the rest of the
    # direction space spanned by "a": within 0.5 of exactly one face, so not a core point
    basis, _ = np.linalg.qr(vectors.T)
    w = faces.rng.standard_normal(DIM)
    w = normalise(w - basis @ (basis.T @ w))
    t = np.sqrt(1 / 0.55**2 - 1)
    lone = normalise(vectors[0] + t * w)
    sims = vectors @ lone
    assert sims[0] == pytest.approx(0.55, abs=1e-4) and sims[1:].max() < 0.5
    (lone_id,) = faces.add("a", embedding=lone)
    counts = faces.cluster()
    assert counts["deferred"] == 1 and counts["newPersons"] == 1 and counts["assigned"] == 6
    assert faces.person_of()[lone_id] == person_for(faces, members["a"])
    # the same face alone with minFaces 3 and nothing assigned near it stays unassigned
    other = Faces(tmp_path / "other", seed=1)
    (only,) = other.add("x", embedding=lone)
    other.add("y", 1, embedding=vectors[0])
    counts = other.cluster()
    assert counts["deferred"] == 2 and counts["newPersons"] == 0 and counts["unassigned"] == 2
    assert other.person_of()[only] is None


def test_faces_on_hidden_assets_never_found_persons(tmp_path):
    faces = Faces(tmp_path)
    visible = faces.add("a", 4)
    hidden_a = faces.add("a", 2, hidden=True)
    hidden_b = faces.add("b", 5, hidden=True)
    counts = faces.cluster()
    assert counts["newPersons"] == 1 and counts["deferred"] == 7
    assert person_for(faces, visible + hidden_a)  # hidden faces still join through the fallback search
    assert all(faces.person_of()[f] is None for f in hidden_b)
    # the person listing leaves out persons seen only on hidden assets
    split_person(faces.store, hidden_b[:2])
    assert list_persons(faces.store)["total"] == 1
    assert list_persons(faces.store, with_hidden=True)["total"] == 2


def test_a_lone_face_is_skipped_not_deferred(tmp_path):
    faces = Faces(tmp_path)
    faces.add("stranger0")
    counts = faces.cluster()
    assert counts == {"processed": 1, "assigned": 0, "newPersons": 0, "deferred": 0, "unassigned": 1,
                      "removedPersons": 0}


def test_min_faces_one_gives_every_face_a_person(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    counts = faces.cluster(min_faces=1)
    assert counts["assigned"] == 34 and counts["newPersons"] == 9 and counts["unassigned"] == 0
    groups = faces.groups()
    assert len(groups) == 9 and all(len(ids) == 1 for ids in groups.values())
    assert len({person_for(faces, [f]) for f in members["strangers"]}) == 4


def test_max_distance_limits_clusters(tmp_path):
    faces = Faces(tmp_path)
    five_identities(faces)
    counts = faces.cluster(max_distance=0.05)  # same-identity faces are ~0.28 apart
    assert counts["newPersons"] == 0 and counts["assigned"] == 0 and counts["unassigned"] == 34


def test_cluster_faces_rejects_bad_parameters(tmp_path):
    faces = Faces(tmp_path)
    for kwargs in ({"min_faces": 0}, {"min_faces": 2.5}, {"max_distance": 0}, {"max_distance": 2.5}):
        with pytest.raises(BadRequest):
            faces.cluster(**kwargs)


def test_cluster_faces_fills_a_missing_index_from_the_store(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    indices: dict = {}
    counts = cluster_faces(faces.store, indices)
    assert counts["newPersons"] == 5
    assert sorted(indices[MODEL].ids.tolist()) == sorted(faces.person_of())
    assert person_for(faces, members["id0"])


def test_face_models_are_clustered_apart(tmp_path):
    faces = Faces(tmp_path)
    first = faces.add("a", 4)
    second = faces.add("a", 4, model="antelopev2")  # same vectors' identity, other model
    faces.cluster()
    assert person_for(faces, first) != person_for(faces, second)


def test_full_recluster_keeps_names_and_manual_work(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.cluster()
    named = person_for(faces, members["id0"])
    name_person(faces.store, named, "Ada")
    keeper = person_for(faces, members["id1"])
    stranger = members["strangers"][0]
    assign_face(faces.store, stranger, keeper)
    dropped = members["id2"][3]
    assign_face(faces.store, dropped, None)
    empty = split_person(faces.store, [members["strangers"][1]], name="Solo")["id"]
    assign_face(faces.store, members["strangers"][1], None)
    faces.clear_outbox()
    counts = faces.cluster(full=True)
    # persons of id2, id3, id4 lose every face and have no name; id0's is named, id1's keeps a manual face
    assert counts["removedPersons"] == 3 and counts["newPersons"] == 3
    assert person_for(faces, members["id0"]) == named
    assert get_person(faces.store, named)["name"] == "Ada"
    assert person_for(faces, members["id1"] + [stranger]) == keeper
    assert faces.person_of()[dropped] is None
    assert faces.store.conn.execute("SELECT assigned FROM faces WHERE id = ?", (dropped,)).fetchone()[0] == "manual"
    assert get_person(faces.store, empty)["faceCount"] == 0  # named person without faces survives
    assert {person_for(faces, [f for f in members[f"id{i}"] if f != dropped]) for i in range(5)} | {empty} == \
        faces.persons()
    assert faces.outbox("face") >= {f for i in range(5) for f in members[f"id{i}"] if f != dropped}
    assert_representatives_valid(faces)


def test_name_person(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.cluster()
    person = person_for(faces, members["id0"])
    faces.clear_outbox()
    named = name_person(faces.store, person, "  Grace Hopper ")
    assert named["name"] == "Grace Hopper" and named["nameSource"] == "user" and named["faceCount"] == 6
    assert faces.outbox("person") == {person}
    cleared = name_person(faces.store, person, "   ")
    assert cleared["name"] is None and cleared["nameSource"] is None
    assert name_person(faces.store, person, "x" * 200)["name"] == "x" * 200
    with pytest.raises(BadRequest):
        name_person(faces.store, person, "x" * 201)
    with pytest.raises(BadRequest):
        name_person(faces.store, person, 5)
    with pytest.raises(NotFound):
        name_person(faces.store, 999, "Nobody")


def test_merge_persons(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.cluster()
    target, first, second = (person_for(faces, members[f"id{i}"]) for i in range(3))
    name_person(faces.store, second, "Second")
    name_person(faces.store, first, "First")
    with pytest.raises(BadRequest):
        merge_persons(faces.store, target, [target, first])
    with pytest.raises(BadRequest):
        merge_persons(faces.store, target, [])
    with pytest.raises(NotFound):
        merge_persons(faces.store, target, [first, 999])
    with pytest.raises(NotFound):
        merge_persons(faces.store, 999, [first])
    faces.clear_outbox()
    merged = merge_persons(faces.store, target, [first, second])
    assert merged["id"] == target and merged["name"] == "First" and merged["faceCount"] == 18
    moved = members["id1"] + members["id2"]
    assert person_for(faces, members["id0"] + moved) == target
    rows = faces.store.conn.execute(f"SELECT DISTINCT assigned FROM faces WHERE id IN ({','.join(map(str, moved))})")
    assert {r[0] for r in rows} == {"manual"}
    assert first not in faces.persons() and second not in faces.persons()
    assert faces.outbox("person") == {target, first, second}
    assert faces.outbox("face") == set(moved)
    # a named target keeps its name
    name_person(faces.store, person_for(faces, members["id3"]), "Third")
    kept = merge_persons(faces.store, target, [person_for(faces, members["id3"])])
    assert kept["name"] == "First"
    assert_representatives_valid(faces)


def test_split_person(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    other_model = faces.add("a", 1, model="antelopev2")
    faces.cluster()
    old = person_for(faces, members["id0"])
    representative = get_person(faces.store, old)["representativeFaceId"]
    moving = [representative, members["id0"][-1]]
    faces.clear_outbox()
    new = split_person(faces.store, moving, name=" Twin ")
    assert new["name"] == "Twin" and new["faceCount"] == 2 and new["id"] not in {old}
    assert person_for(faces, moving) == new["id"]
    remaining = get_person(faces.store, old)
    assert remaining["faceCount"] == 4 and remaining["representativeFaceId"] not in moving
    assert faces.outbox("person") == {old, new["id"]} and faces.outbox("face") == set(moving)
    rows = faces.store.conn.execute(f"SELECT assigned FROM faces WHERE id IN ({','.join(map(str, moving))})")
    assert {r[0] for r in rows} == {"manual"}
    # splitting every face off an unnamed person deletes it
    last = split_person(faces.store, [f for f in members["id0"] if f not in moving])
    assert old not in faces.persons() and last["name"] is None
    with pytest.raises(BadRequest):
        split_person(faces.store, [])
    with pytest.raises(NotFound):
        split_person(faces.store, [members["id1"][0], 9999])
    with pytest.raises(BadRequest):
        split_person(faces.store, [members["id1"][0], other_model[0]])
    with pytest.raises(BadRequest):
        split_person(faces.store, [members["id1"][0]], name="x" * 201)
    assert_representatives_valid(faces)


def test_delete_person_is_not_recreated_by_the_next_incremental_run(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    faces.cluster()
    person = person_for(faces, members["id3"])
    faces.clear_outbox()
    assert delete_person(faces.store, person) == {"id": person, "unassignedFaces": 6}
    assert person not in faces.persons()
    assert all(faces.person_of()[f] is None for f in members["id3"])
    assert faces.outbox("person") == {person} and faces.outbox("face") == set(members["id3"])
    with pytest.raises(NotFound):
        delete_person(faces.store, person)
    assert faces.cluster()["processed"] == 0
    assert all(faces.person_of()[f] is None for f in members["id3"])
    counts = faces.cluster(full=True)  # reconsiders them: every unnamed person is rebuilt
    assert counts["removedPersons"] == 4 and counts["newPersons"] == 5
    assert person_for(faces, members["id3"]) and len(faces.persons()) == 5


def test_assign_face(tmp_path):
    faces = Faces(tmp_path)
    members = five_identities(faces)
    other_model = faces.add("a", 1, model="antelopev2")
    faces.cluster()
    source, target = person_for(faces, members["id0"]), person_for(faces, members["id1"])
    representative = get_person(faces.store, source)["representativeFaceId"]
    faces.clear_outbox()
    face = assign_face(faces.store, representative, target)
    assert face["personId"] == target and face["assigned"] == "manual" and face["id"] == representative
    assert set(face) == {"id", "assetId", "box", "score", "personId", "assigned", "model"}
    assert get_person(faces.store, source)["representativeFaceId"] in members["id0"]
    assert get_person(faces.store, source)["representativeFaceId"] != representative
    assert faces.outbox("face") == {representative} and faces.outbox("person") == {source, target}
    # manual unassignment: clustering, full runs included, leaves the face alone
    unassigned = assign_face(faces.store, members["id0"][1], None)
    assert unassigned["personId"] is None and unassigned["assigned"] == "manual"
    faces.cluster(full=True)
    assert faces.person_of()[members["id0"][1]] is None
    # a person left with no faces and no name is deleted
    lone = split_person(faces.store, [members["strangers"][0]])["id"]
    assign_face(faces.store, members["strangers"][0], target)
    assert lone not in faces.persons()
    with pytest.raises(NotFound):
        assign_face(faces.store, 9999, target)
    with pytest.raises(NotFound):
        assign_face(faces.store, members["id0"][2], 9999)
    with pytest.raises(BadRequest):
        assign_face(faces.store, other_model[0], target)
    assert_representatives_valid(faces)


def test_listing_pages_and_orders(tmp_path):
    faces = Faces(tmp_path)
    members = {f"id{i}": faces.add(f"id{i}", 3 + i) for i in range(5)}
    strangers = [faces.add(f"stranger{i}")[0] for i in range(3)]
    faces.cluster()
    page = list_persons(faces.store, offset=0, limit=2)
    assert page["total"] == 5
    assert [p["faceCount"] for p in page["items"]] == [7, 6]
    assert page["items"][0]["id"] == person_for(faces, members["id4"])
    rest = list_persons(faces.store, offset=2, limit=10)
    assert [p["faceCount"] for p in rest["items"]] == [5, 4, 3] and rest["total"] == 5
    item = rest["items"][0]
    assert set(item) == {"id", "name", "nameSource", "faceCount", "assetCount", "representativeFaceId",
                         "createdAt", "updatedAt"}
    assert isinstance(item["createdAt"], float) and item["updatedAt"] >= item["createdAt"]
    # a named person without faces is listed last (0 faces)
    solo = split_person(faces.store, [strangers[0]], name="Solo")["id"]
    assign_face(faces.store, strangers[0], None)
    everyone = list_persons(faces.store, limit=100)
    assert everyone["total"] == 6 and everyone["items"][-1]["id"] == solo and everyone["items"][-1]["faceCount"] == 0
    sample = get_person(faces.store, person_for(faces, members["id4"]), sample=3)
    assert len(sample["faces"]) == 3 and sample["faceCount"] == 7
    assert [f["score"] for f in sample["faces"]] == sorted((f["score"] for f in sample["faces"]), reverse=True)
    with pytest.raises(NotFound):
        get_person(faces.store, 999)
    unassigned = unassigned_faces(faces.store, offset=1, limit=1)
    assert unassigned["total"] == 3 and [f["id"] for f in unassigned["items"]] == [strangers[1]]
    assert unassigned["items"][0]["box"] == {"x1": 10.0, "y1": 20.0, "x2": 110.0, "y2": 140.0}
    for bad in ({"offset": -1}, {"limit": 0}, {"limit": 100000}):
        with pytest.raises(BadRequest):
            list_persons(faces.store, **bad)
        with pytest.raises(BadRequest):
            unassigned_faces(faces.store, **bad)


def test_person_thumbnail(tmp_path):
    faces = Faces(tmp_path)
    red, blue = jpeg((255, 0, 0)), jpeg((0, 0, 255))
    with_thumbnails = faces.add("a", 2, thumbnail=red, score=0.7)
    best = faces.add("a", 1, thumbnail=blue, score=0.8)
    without = faces.add("a", 1, thumbnail=None, score=0.95)
    faces.add("b", 3)
    faces.cluster()
    person = person_for(faces, with_thumbnails + best + without)
    assert get_person(faces.store, person)["representativeFaceId"] == with_thumbnails[0]
    assert person_thumbnail(faces.store, person) == red
    assert Image.open(io.BytesIO(person_thumbnail(faces.store, person))).format == "JPEG"
    # representative without a thumbnail: the best-scoring face that has one
    faces.store.conn.execute("UPDATE persons SET representative_face = ? WHERE id = ?", (without[0], person))
    assert person_thumbnail(faces.store, person) == blue
    with pytest.raises(NotFound):
        person_thumbnail(faces.store, person_for(faces, [f for f, i in faces.identity.items() if i == "b"]))
    with pytest.raises(NotFound):
        person_thumbnail(faces.store, 999)


async def test_clustering_through_the_running_sidecar(tmp_path):
    sidecar = Sidecar(offline_settings(tmp_path))
    await sidecar.start()
    try:
        helper = Faces(tmp_path / "vectors")
        for n in range(8):
            identity = "a" if n < 4 else "b"
            face = FaceResult((0.0, 0.0, 50.0, 50.0), 0.9, helper.embedding(identity).astype(np.float32))
            await sidecar.save(AssetResults(f"{n:032x}", 100 + n, 64, 64, faces=(MODEL, [face])))
        settings = sidecar.settings
        counts = await sidecar.call(cluster_faces, sidecar.faces, settings.face_min_faces, settings.face_max_distance)
        assert counts["newPersons"] == 2 and counts["assigned"] == 8
        listing = await sidecar.call(list_persons)
        assert [p["faceCount"] for p in listing["items"]] == [4, 4]
    finally:
        await sidecar.stop()
