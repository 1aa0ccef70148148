"""Suite ordering: with ``-n 2 --dist loadfile`` (pyproject) files go to the two workers in
collection order, so the one long file (the demo, ≈8 of the suite's ≈20 CPU-minutes) is moved to
the front and runs beside all the others instead of after them."""

LONGEST_FIRST = ("tests/test_demo.py",)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: 0 if item.nodeid.startswith(LONGEST_FIRST) else 1)
