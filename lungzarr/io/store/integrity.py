"""Integrity: which stage wrote which array, and reading every chunk to find damage (``verify``)."""
from __future__ import annotations


class _Integrity:
    """Part of :class:`~lungzarr.io.store.CohortStore`: verifying a patient's chunks."""

    @staticmethod
    def array_stage(name: str, owners: dict, creator: str) -> str:
        """The stage that writes the array ``name`` of a patient group (``"nodules/prob_max"`` for a child's).

        ``owners`` maps a stage to ``{"arrays": (...), "subgroups": (...)}`` (the
        pipeline's stage registry says what each writes); every other array of
        the group (coordinates, a legacy import's) belongs to ``creator``, the
        stage that created the group.
        """
        head = name.split("/", 1)[0]
        for stage, owned in owners.items():
            # A child group may be nested (``labels/lungs``): it owns every array below it.
            if (any(name == g or name.startswith(g + "/") for g in owned.get("subgroups", ()))
                    or head in owned.get("arrays", ())):
                return stage
        return creator

    def verify_patient(self, patient: str, *, owners: dict, creator: str) -> dict:
        """Read every chunk of every array of ``patient``'s completed stages.

        ``owners`` and ``creator`` say which stage wrote which array (see
        :meth:`array_stage`).

        A chunk is damaged when its file is missing (every chunk is written,
        so none may be absent), when its checksum does not match its bytes, or
        when it cannot be decoded; a stage's array or child group that is not
        there at all is damaged too. Arrays of stages not marked complete are
        not read (they are redone anyway).

        Returns
        -------
        dict
            ``patient``, ``arrays``, ``chunks`` and ``bytes`` read, and
            ``damage``: one record per damaged chunk or array with
            ``patient``, ``stage`` (the one that wrote it), ``array``,
            ``chunk``, ``kind`` ("missing", "checksum" or "undecodable"),
            ``file`` and ``reason``; ``unchecksummed``: arrays written before
            lungzarr checksummed every chunk (read, but a chunk file missing
            there may be the fill value, so it is not counted as damage).
        """
        stages = self.stages(patient)
        folder = self.path / self.group_path(patient)
        report = {"patient": patient, "arrays": 0, "chunks": 0, "bytes": 0, "damage": [], "unchecksummed": []}

        def damaged(stage, array, kind, file, reason, chunk=None):
            report["damage"].append({"patient": patient, "stage": stage, "array": array, "chunk": chunk,
                                     "kind": kind, "file": str(file),
                                     "reason": f"{reason}; `lungzarr run --verify` redoes the {stage} stage"})

        _find_missing_outputs(folder, stages, owners, damaged)
        for name, array_dir in self._stored_arrays(folder, stages, owners, creator, damaged):
            stage = self.array_stage(name, owners, creator)
            if stage not in stages:
                continue
            self._verify_array(name, array_dir, stage, report, damaged)
        return report

    def _stored_arrays(self, folder, stages: dict, owners: dict, creator: str, damaged) -> list:
        """``(name relative to the patient group, folder)`` of each array of the patient group ``folder``
        and of its stages' child groups; a node whose metadata cannot be read is passed to ``damaged``
        (when its stage is complete)."""
        import json

        arrays = []  # (name relative to the patient group, folder)
        subgroups = {g for o in owners.values() for g in o.get("subgroups", ())}

        def collect(parent, prefix):
            """The arrays of ``parent`` (the patient group, or a group on the way to a stage's child group)."""
            for entry in sorted(p for p in parent.iterdir() if p.is_dir()):
                name = f"{prefix}{entry.name}"
                try:
                    node = json.loads((entry / "zarr.json").read_text()).get("node_type")
                except FileNotFoundError:
                    continue  # not a zarr node (nothing lungzarr writes)
                except (ValueError, UnicodeDecodeError) as exc:
                    stage = self.array_stage(name, owners, creator)
                    if stage in stages:
                        damaged(stage, name, "undecodable", entry / "zarr.json",
                                f"the metadata of {name!r} cannot be read ({exc})")
                    continue
                if node == "array" and not prefix:
                    arrays.append((name, entry))
                elif node == "group" and name in subgroups:
                    arrays.extend((f"{name}/{child.name}", child)
                                  for child in sorted(entry.iterdir()) if (child / "zarr.json").is_file())
                elif node == "group" and any(g.startswith(name + "/") for g in subgroups):
                    collect(entry, name + "/")  # e.g. ``labels``, which holds ``labels/lungs``

        collect(folder, "")
        return arrays

    def _verify_array(self, name: str, array_dir, stage: str, report: dict, damaged) -> None:
        """Read every chunk of the array ``name`` (in ``array_dir``), written by ``stage``: counted in
        ``report``, damage passed to ``damaged``."""
        import itertools

        try:
            array = self._zarr.open_array(self._zstore, path=str(array_dir)[len(str(self.path)) + 1:],
                                          mode="r", zarr_format=3)
        except Exception as exc:  # metadata that parses but does not describe an array
            damaged(stage, name, "undecodable", array_dir / "zarr.json",
                    f"{name!r} cannot be opened ({type(exc).__name__}: {exc})")
            return
        report["arrays"] += 1
        # Arrays written before lungzarr checksummed its chunks also left chunks of only the fill
        # value unwritten: there a missing file is not damage, and a changed chunk may go unseen.
        checksummed = any(getattr(c, "to_dict", lambda: {})().get("name") == "crc32c"
                          for c in array.metadata.codecs)
        if not checksummed:
            report["unchecksummed"].append(name)
        for coords in itertools.product(*(range(n) for n in array.cdata_shape)):
            key = array.metadata.encode_chunk_key(coords)
            file = array_dir / key
            if not file.is_file():
                if checksummed:
                    damaged(stage, name, "missing", file, f"chunk {key} of {name!r} is missing", chunk=key)
                continue
            report["chunks"] += 1
            report["bytes"] += file.stat().st_size
            try:
                array.get_block_selection(coords)
            except ValueError as exc:
                if "checksum" not in str(exc):
                    damaged(stage, name, "undecodable", file,
                            f"chunk {key} of {name!r} cannot be decoded ({exc})", chunk=key)
                else:
                    damaged(stage, name, "checksum", file, f"chunk {key} of {name!r} fails its checksum "
                            f"(its bytes changed after it was written)", chunk=key)
            except Exception as exc:
                damaged(stage, name, "undecodable", file,
                        f"chunk {key} of {name!r} cannot be decoded ({type(exc).__name__}: {exc})", chunk=key)


def _find_missing_outputs(folder, stages: dict, owners: dict, damaged) -> None:
    """Pass to ``damaged`` each array or child group a completed stage writes that the patient group
    ``folder`` does not hold."""
    for stage, record in stages.items():
        legacy = record.get("source") == "import-legacy"  # wrote what the old layout had, under ingest
        owned = owners.get(stage, {})
        # An import wrote only what the old layout had (no NGFF labels either).
        expected = [] if legacy else list(owned.get("subgroups", ())) + list(owned.get("arrays", ()))
        for name in expected:
            if not (folder / name / "zarr.json").is_file():
                damaged(stage, name, "missing", folder / name, f"{name!r} is missing from the store")
