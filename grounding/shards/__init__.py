"""The HDF5 shard store: writer, lazy reader, manifest, content keys, verification, torch Dataset."""

from grounding.shards.keys import code_version, digest, file_sha256, stage_key
from grounding.shards.manifest import FieldSpec, Manifest, ShardError, ShardInfo
from grounding.shards.reader import ShardSet
from grounding.shards.verify import VerifyReport, verify_shard_set
from grounding.shards.writer import ItemFailed, ShardSetSpec, ShardWriter, is_complete

__all__ = [
    "FieldSpec", "ItemFailed", "Manifest", "ShardError", "ShardInfo", "ShardSet", "ShardSetSpec",
    "ShardWriter", "VerifyReport", "code_version", "digest", "file_sha256", "is_complete", "stage_key",
    "verify_shard_set",
]
