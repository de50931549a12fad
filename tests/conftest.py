"""Session order: the documentation-site test runs last.

``tests/test_docs_site.py`` builds the site from the notebooks that ``tests/test_notebooks.py``
executed and stored in ``build/notebooks/``; run after them, the build executes no notebook a
second time.
"""

LAST = ("test_docs_site.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name in LAST)      # stable: the rest keep their order
