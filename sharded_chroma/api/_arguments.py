"""Argument checks of the client that chromadb leaves to the server, done before anything is
sent, with the server's own words (the backend's reserved metadata would otherwise turn some
refused arguments into valid requests)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any, cast

import orjson
from chromadb.api.collection_configuration import (
    CreateCollectionConfiguration,
    create_collection_configuration_to_json,
)
from chromadb.api.types import Schema
from chromadb.errors import InvalidArgumentError, NotFoundError, error_types

__all__ = ["refuse_metadata_like_server", "refuse_unaddressable"]

# The server's collection-name rule (Chroma's Rust validators). Only needed to word the refusal
# of an empty metadata, which the server joins to its verdict on the name.
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]")


def _name_problem(name: str) -> str | None:
    """What the server says about a collection name it refuses, or None for a valid name."""
    if not _NAME_RE.fullmatch(name):
        return (
            "Expected a name containing 3-512 characters from [a-zA-Z0-9._-], starting and "
            f"ending with a character in [a-zA-Z0-9]. Got: {name}"
        )
    if ".." in name:
        return f"Expected a name that does not contains two consecutive periods (..). Got {name}"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    return f"Expected a name that is not a valid ip address. Got {name}"


def refuse_metadata_like_server(
    name: object,
    schema: Schema | None,
    configuration: CreateCollectionConfiguration,
    metadata: object,
    get_or_create: bool,
) -> None:
    """Raise what the official client ends with for a collection metadata the server refuses
    (empty, or not a map), before anything is sent.

    The backend adds its reserved keys to the metadata, so such a metadata would reach the
    servers as a valid one and create the collection. The official client's own steps run
    first, so their errors win as they would there. A name that is not a string is left to the
    server, which refuses it before looking at the metadata, and the backend sends it first.
    """
    if metadata is None or (isinstance(metadata, dict) and metadata) or not isinstance(name, str):
        return
    config_json = (
        create_collection_configuration_to_json(configuration, cast(Any, metadata))
        if configuration
        else None
    )
    body = {
        "name": name,
        "metadata": metadata,
        "configuration": config_json,
        "schema": schema.serialize_to_json() if schema else None,
        "get_or_create": get_or_create,
    }
    # Unserialisable values fail here with orjson's error, as in the official client.
    orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not isinstance(metadata, dict):
        # The server's answer names the byte offset of its body, which is not ours to copy.
        # Built from chromadb's table, as the official client builds it (the class is abstract).
        raise error_types["ChromaError"](
            "Failed to deserialize the JSON body into the target type: metadata: invalid type: "
            f"{type(metadata).__name__}, expected a map"
        )
    problems = [f"name: {problem}"] if (problem := _name_problem(name)) else []
    problems.append("metadata: Metadata cannot be empty")
    raise InvalidArgumentError("Validation error: " + "\n".join(problems))


def refuse_unaddressable(name: object) -> None:
    """A name that is not one segment of a request path would reach another route (the
    official client's ``delete_collection("..")`` deletes the database). No collection can have
    such a name, since the server refuses it on create, so it is not found, and nothing is sent.
    """
    if isinstance(name, str) and (name in ("", ".", "..") or "/" in name):
        raise NotFoundError(f"Collection [{name}] does not exist")
