"""MongoDB's store identity, over mongomock (a fake: it exercises MongoStore's logic, not a
server). The shared contract runs ``store_id`` on every backend; these cover what only
MongoDB has: the id as an upserted meta document, and losing an upsert race."""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.errors import DuplicateKeyError

from sidecar.store.mongo import MongoStore
from tests.store.conftest import fake_mongo_store

pytestmark = pytest.mark.fake


def test_store_id_is_kept_in_a_meta_document(monkeypatch: pytest.MonkeyPatch) -> None:
    store = fake_mongo_store(monkeypatch)
    assert isinstance(store, MongoStore)
    try:
        store_id = store.store_id()
        doc = store._meta.find_one({"_id": "store_id"})
        assert doc is not None and doc["value"] == store_id
        # Another handle on the same database reads it rather than making a new one.
        other = MongoStore("mongodb://mongomock.invalid:27017", database="sidecar_fake")
        other._meta = store._meta
        assert other.store_id() == store_id
        assert store._meta.count_documents({}) == 1
    finally:
        store.close()


def test_losing_the_upsert_race_reads_the_winners_id(monkeypatch: pytest.MonkeyPatch) -> None:
    store = fake_mongo_store(monkeypatch)
    assert isinstance(store, MongoStore)
    meta = store._meta
    real_update_one = meta.update_one

    def racing_update_one(*args: Any, **kwargs: Any) -> Any:
        # Another process's upsert lands first; ours then collides on the unique _id.
        meta.insert_one({"_id": "store_id", "value": "f" * 32})
        raise DuplicateKeyError("E11000 duplicate key error")

    monkeypatch.setattr(meta, "update_one", racing_update_one)
    try:
        assert store.store_id() == "f" * 32
    finally:
        monkeypatch.setattr(meta, "update_one", real_update_one)
        store.close()
