import shmstore


def test_put_get_roundtrip(store):
    assert store.put("k", {"a": 1}) > 0
    assert store.get("k") == {"a": 1}
    assert store.get(b"k") == {"a": 1}
    assert store.get("missing", 7) == 7
