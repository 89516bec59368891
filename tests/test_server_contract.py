"""The server contract: what the installed chromadb's collection classes call on their client.

``ShardedCollection`` is chromadb's own ``AsyncCollection`` bound to ``ShardedServer``. These
tests read the collection classes' sources, so a chromadb release that calls a new private
method (or renames a parameter) fails here rather than at a user's first call.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import typing

import pytest
from chromadb.api import ServerAPI
from chromadb.api.async_api import AsyncServerAPI
from chromadb.api.models.AsyncCollection import AsyncCollection
from chromadb.api.models.Collection import Collection

from sharded_chroma.api._server import CollectionServer, ShardedServer


def client_calls(cls: type) -> set[str]:
    """Names of ``self._client.<name>`` attributes used anywhere in ``cls``'s source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "_client"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def protocol_members(proto: type) -> set[str]:
    return {
        name
        for name, value in vars(proto).items()
        if callable(value) and not (name.startswith("__") and name.endswith("__"))
    } - set(vars(typing.Protocol))


def test_extraction_sees_the_calls_it_must() -> None:
    # Guards the extractor itself: if it found nothing, the tests below could not fail.
    assert {"_add", "_get", "_query", "_upsert", "_delete"} <= client_calls(AsyncCollection)


def test_protocol_is_exactly_what_async_collection_calls() -> None:
    assert protocol_members(CollectionServer) == client_calls(AsyncCollection)


@pytest.mark.parametrize("cls", [AsyncCollection, Collection], ids=lambda c: c.__name__)
def test_adapter_has_every_method_the_collection_classes_call(cls: type) -> None:
    missing = sorted(n for n in client_calls(cls) if not callable(getattr(ShardedServer, n, None)))
    assert not missing, f"ShardedServer lacks {missing}, which chromadb's {cls.__name__} calls"


@pytest.mark.parametrize("name", sorted(client_calls(AsyncCollection)))
def test_adapter_accepts_chromadbs_parameters(name: str) -> None:
    """AsyncCollection passes keywords: every parameter of the abstract server method must be
    accepted by the adapter under the same name, and the adapter must not require more."""
    theirs = inspect.signature(getattr(AsyncServerAPI, name)).parameters
    ours = inspect.signature(getattr(ShardedServer, name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values()):
        return  # a Cloud-only method that refuses whatever it is given
    assert list(ours)[: len(theirs)] == list(theirs), (name, list(ours), list(theirs))
    extra = [n for n in list(ours)[len(theirs) :] if ours[n].default is inspect.Parameter.empty]
    assert not extra, f"{name} requires {extra}, which chromadb never passes"


@pytest.mark.parametrize("name", sorted(client_calls(AsyncCollection)))
def test_async_methods_are_coroutines(name: str) -> None:
    assert inspect.iscoroutinefunction(getattr(ShardedServer, name))


def test_sync_collection_calls_are_known_to_the_sync_server_api() -> None:
    # The sync client (a later change) binds chromadb's Collection to the same contract; the
    # names it calls must at least exist on chromadb's own ServerAPI.
    unknown = sorted(n for n in client_calls(Collection) if not hasattr(ServerAPI, n))
    assert not unknown, unknown
