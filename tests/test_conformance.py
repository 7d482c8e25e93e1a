"""The DICOM conformance statement (docs/conformance-statement.md) says what the code does: its SOP class and
transfer syntax tables are read here and compared with the objects radfed writes and the contexts its Storage SCP
accepts, so neither can change without the other."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pynetdicom import VerificationPresentationContexts

from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.study import render_study
from radfed.plugin.node.scp import STORAGE_CONTEXTS
from tests.dicom_sr.conftest import result_from_study

STATEMENT = Path(__file__).resolve().parents[1] / "docs" / "conformance-statement.md"
_UID = re.compile(r"`(\d+(?:\.\d+)+)`")
_VERIFICATION = "1.2.840.10008.1.1"
_NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six"}


def _section(number: str) -> str:
    """The text under the heading numbered ``number`` (e.g. ``4.2.1.3``), up to the next heading as high."""
    lines = STATEMENT.read_text(encoding="utf-8").splitlines()
    heading = re.compile(rf"^(#+) {re.escape(number)} ")
    for start, line in enumerate(lines):
        match = heading.match(line)
        if match:
            level = len(match.group(1))
            end = next(
                (i for i in range(start + 1, len(lines)) if re.match(rf"^#{{1,{level}}} ", lines[i])),
                len(lines),
            )
            return "\n".join(lines[start + 1 : end])
    raise AssertionError(f"the statement has no section {number}")


def _table(text: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in ``text``, without header and rule."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start:end]
    assert len(rows) > 2, "no table"
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _uids(cell: str) -> list[str]:
    return _UID.findall(cell)


@pytest.fixture(scope="module")
def written() -> list[Dataset]:
    """Every object a job can store: default profile, LABELMAP SEG, and key images."""
    study = render_study(site_profile(2, small=True), 42, 21, n_lesions=2)
    result = result_from_study(study)
    assert result.lesions and np.count_nonzero(result.lesion_labels)
    objects = []
    for profile in (OutputProfile(), OutputProfile(seg_encoding="LABELMAP"), OutputProfile(key_images=True)):
        objects.extend(build_results(result, profile).datasets())
    return objects


def test_the_scu_contexts_are_those_of_the_objects_written(written: list[Dataset]) -> None:
    stated = set()
    for row in _table(_section("4.2.1.3")):
        (abstract,), (transfer,) = _uids(row[1]), _uids(row[3])
        stated.add((abstract, transfer))
    assert stated == {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in written}


@pytest.mark.parametrize("section", ["1", "4.2.1.1"])
def test_the_sop_classes_used_as_scu_are_those_written(section: str, written: list[Dataset]) -> None:
    rows = [row for row in _table(_section(section)) if _uids(row[1])]
    as_scu = {_uids(row[1])[0] for row in rows if not row[2].startswith("No")}
    assert as_scu == {str(ds.SOPClassUID) for ds in written}


def test_annex_8_9_lists_exactly_the_storage_classes_the_scp_accepts() -> None:
    stated = [uid for row in _table(_section("8.9")) for uid in _uids(row[1])]
    accepted = [str(cx.abstract_syntax) for cx in STORAGE_CONTEXTS]
    assert len(stated) == len(set(stated))
    assert set(stated) == set(accepted)
    count = re.search(r"the (\d+) storage SOP classes", _section("4.2.2.1"))
    assert count is not None and int(count.group(1)) == len(accepted)


def test_the_overview_says_scp_only_for_what_the_scp_accepts() -> None:
    accepted = {str(cx.abstract_syntax) for cx in STORAGE_CONTEXTS} | {_VERIFICATION}
    rows = [row for row in _table(_section("1")) if _uids(row[1])]
    as_scp = {_uids(row[1])[0] for row in rows if row[3].startswith("Yes")}
    assert as_scp and as_scp <= accepted
    refused = {_uids(row[1])[0] for row in rows if row[3].startswith("No")}
    assert not refused & accepted


def test_the_scp_accepts_the_stated_transfer_syntaxes() -> None:
    rows = _table(_section("4.2.2.4").split("*Accepted presentation contexts.*", 1)[1])
    verification = next(row for row in rows if _VERIFICATION in _uids(row[0]))
    stated = set(_uids(verification[1]))
    assert {str(ts) for cx in VerificationPresentationContexts for ts in cx.transfer_syntax} == stated
    storage = next(row for row in rows if "8.9" in row[0])
    assert storage[1] == f"the same {_NUMBER_WORDS[len(stated)]}"
    for cx in STORAGE_CONTEXTS:
        assert {str(ts) for ts in cx.transfer_syntax} == stated, cx.abstract_syntax
