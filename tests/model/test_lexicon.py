"""The lexicon evaluation of the demo RM: the published lexicon is found through its
distribution and read whole, the words the demo was tuned on are really left out, and a word's
credit is the service's token rewards summed over the word's tokens. The evaluation reports
figures; no test here judges them.
"""

from __future__ import annotations

import json
import re
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenreward_service.demo import MODEL_DIR
from tokenreward_service.demo.data import EXAMPLES, NEUTRAL, PROBES
from tokenreward_service.demo.evaluate import credit, score_texts
from tokenreward_service.demo.lexicon import (
    FRAMES,
    SENTENCES,
    Placement,
    credit_figures,
    evaluate_lexicon,
    excluded_words,
    held_out_words,
    lexicon_path,
    load_lexicon,
    main,
    place_words,
    read_texts,
    sentence_ranks,
    spearman,
    split_words,
    trained_words,
    training_counts,
    word_credit,
)
from tokenreward_service.loading import load_reward_model
from tokenreward_service.model import RewardModel


@pytest.fixture(scope="module")
def demo() -> RewardModel:
    return load_reward_model(MODEL_DIR, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lexicon() -> dict[str, float]:
    return load_lexicon()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_the_lexicon_file_is_found_through_its_distribution(lexicon: dict[str, float]) -> None:
    path = lexicon_path()
    dist = distribution("vaderSentiment")
    assert dist.version == "3.3.2"
    assert path.name == "vader_lexicon.txt"
    assert path.is_file()
    assert path in {Path(str(dist.locate_file(f))) for f in dist.files or ()}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 7520
    assert len(lexicon) == len({line.split("\t")[0] for line in lines}) == 7506
    assert lexicon["good"] == 1.9
    assert lexicon["horrible"] == -2.5
    assert lexicon[":)"] == 2.0
    assert lexicon["fav"] == 2.0  # two lines (2.4, then 2.0): the later wins, as in VADER


def test_load_lexicon_reads_tabs_crlf_and_duplicates_and_refuses_other_lines(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.txt"
    good.write_bytes(
        b"nice\t1.5\t0.5\t[1, 2]\r\n:(\t-1.9\t0.3\t[-2]\r\n\r\nnice\t2.5\t0.5\t[3]\r\n"
    )
    assert load_lexicon(good) == {"nice": 2.5, ":(": -1.9}
    bad = tmp_path / "bad.txt"
    bad.write_text("nice\t1.5\n")
    with pytest.raises(ValueError, match="line 1"):
        load_lexicon(bad)


def test_the_words_the_demo_was_tuned_on_are_left_out(lexicon: dict[str, float]) -> None:
    words, excluded = held_out_words(lexicon)
    names = {word for word, _ in words}
    probe_words = {w for _, positive, negative in PROBES for w in (*positive, *negative)}
    hand_written = probe_words | {w for text in (*EXAMPLES, *NEUTRAL) for w in _words(text)}
    hand_written |= {w for frames, _, _ in PROBES for frame in frames for w in _words(frame)}
    strong = {w for w in hand_written if abs(lexicon.get(w, 0.0)) >= 2}
    # There is something to leave out ("great", "worst", "honestly" of a PROBES frame) ...
    assert {"great", "hate", "worst", "honestly"} <= strong
    # ... and it is left out, and reported as such.
    assert not names & hand_written
    assert set(excluded) == strong
    assert excluded_words() >= hand_written
    assert len(names) == len(words)
    assert len(words) + len(excluded) == sum(
        1 for w, v in lexicon.items() if re.fullmatch("[a-z]+", w) and abs(v) >= 2
    )
    assert all(abs(v) >= 2 and re.fullmatch("[a-z]+", w) for w, v in words)
    assert words == sorted(words)
    assert {v > 0 for _, v in words} == {True, False}


def test_frames_and_sentences_carry_no_other_sentiment_word(lexicon: dict[str, float]) -> None:
    probe_frames = {frame for frames, _, _ in PROBES for frame in frames}
    for frame in FRAMES:
        assert frame.count("{}") == 1
        assert frame not in probe_frames
        assert not [w for w in _words(frame) if w in lexicon], frame
    excluded = excluded_words()
    for text, word, sign in SENTENCES:
        assert _words(text).count(word) == 1, text
        assert word not in excluded, word
        assert lexicon.get(word, sign) * sign > 0, word
        assert not [w for w in _words(text) if w in lexicon and w != word], text
    assert sorted(sign for _, _, sign in SENTENCES) == [-1] * 20 + [1] * 20


def test_word_credit_is_the_sum_of_the_token_rewards_over_the_word(demo: RewardModel) -> None:
    from transformers import LlamaForSequenceClassification

    hf = LlamaForSequenceClassification.from_pretrained(MODEL_DIR, dtype=torch.float32)
    hf.eval()
    tokenizer = demo.tokenizer
    assert tokenizer is not None
    frame, word = "they called it {} in the email", "abhorrent"
    text = frame.format(word)
    start = text.index(word)
    # Plain transformers, each token's reward read as the service hands it out.
    direct = credit(hf, tokenizer, text)
    inside = [r for _, r, (a, b) in direct if a < start + len(word) and b > start]
    outside = [r for _, r, (a, b) in direct if not (a < start + len(word) and b > start)]
    assert len(inside) >= 3  # the word spans several tokens, so the sum is what is tested
    [placed] = place_words(demo, [(word, -3.1)], [frame])
    assert placed.credit == pytest.approx(sum(inside), abs=1e-4)
    assert placed.others == pytest.approx(outside, abs=1e-4)
    assert placed.credit != pytest.approx(inside[-1], abs=1e-3)
    # The end score is read after the EOS suffix; the rewards sum from the BOS score.
    ids = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    scores = score_texts(hf, [ids])[0]
    assert placed.score == pytest.approx(float(scores[-1]), abs=1e-4)
    assert placed.prompt_score == pytest.approx(float(scores[0]), abs=1e-4)
    total = placed.credit + sum(placed.others)
    assert total == pytest.approx(placed.score - placed.prompt_score, abs=1e-6)


def test_read_texts_gives_the_same_rewards_in_any_batch(demo: RewardModel) -> None:
    texts = ["the room was dirty", "x", "we talked about the weather at lunch today"]
    together = read_texts(demo, texts, batch_size=3)
    alone = [read_texts(demo, [text])[0] for text in texts]
    for a, b in zip(together, alone, strict=True):
        assert [t for t, _, _ in a.tokens] == [t for t, _, _ in b.tokens]
        assert "".join(t for t, _, _ in a.tokens) == a.text
        assert [r for _, r, _ in a.tokens] == pytest.approx([r for _, r, _ in b.tokens], abs=1e-5)
    reading = together[0]
    word, others = word_credit(reading, len("the room was "), len(reading.text))
    assert len(others) == 3  # "the", " room", " was"
    assert word + sum(others) == pytest.approx(reading.score - reading.prompt_score, abs=1e-6)


def test_sentence_ranks_count_the_word_as_one_and_rank_by_magnitude(demo: RewardModel) -> None:
    [row] = sentence_ranks(demo, [("the room was dirty and the wifi never worked", "dirty", -1)])
    reading = read_texts(demo, [row["text"]])[0]
    start = row["text"].index("dirty")
    word, others = word_credit(reading, start, start + len("dirty"))
    assert row["credit"] == pytest.approx(word)
    assert row["tokens"] == len(others) + 1 < len(reading.tokens)  # "dirty" is several tokens
    magnitudes = sorted([abs(word), *map(abs, others)], reverse=True)
    assert row["rank"] == 1 + magnitudes.index(abs(word))
    assert abs(row["top_reward"]) == max(abs(r) for r in others)


def test_spearman_uses_mean_ranks_for_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] against [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])  # NaN
    with pytest.raises(ValueError, match="values against"):
        spearman([1, 2], [1])


def test_credit_figures_count_what_they_say() -> None:
    def place(word: str, valence: float, credit: float, others: tuple[float, ...]) -> Placement:
        return Placement(word, valence, "f {}", credit, others, 1.0 + credit, 1.0)

    placements = [
        place("a", 3.0, 0.9, (0.1, -0.2, 0.05)),  # right sign, largest, above the median
        place("b", 2.0, -0.1, (0.3, 0.0, 0.2)),  # wrong sign, below the median
        place("c", -2.5, -0.15, (0.5, 0.1, 0.12)),  # right sign, above the median, not largest
        place("d", -3.5, 0.0, (0.01, 0.02, 0.03)),  # no credit: no sign
    ]
    figures = credit_figures(placements)
    assert figures["words"] == 4
    assert figures["texts"] == 4
    assert figures["sign_positive"] == 0.5
    assert figures["sign_negative"] == 0.5
    assert figures["above_median"] == 0.5
    assert figures["top"] == 0.25
    assert figures["word_mean_abs"] == pytest.approx((0.9 + 0.1 + 0.15) / 4)
    assert figures["other_mean_abs"] == pytest.approx(1.63 / 12)
    # credit ranks [4, 2, 1, 3] against valence ranks [4, 3, 2, 1]
    assert figures["spearman"] == pytest.approx(0.4)
    assert figures["auc"] == 0.75
    assert figures["end_sign_positive"] == 0.5
    assert figures["end_raw_sign_negative"] == 0.0  # the raw end scores are all above zero
    assert figures["end_auc"] == figures["auc"]


def test_training_counts_come_from_the_demo_corpus() -> None:
    counts = training_counts(["flight", "the", "zzzqxv"])
    assert counts is not None
    assert counts["flight"] > 100
    assert counts["the"] > counts["flight"]
    assert counts["zzzqxv"] == 0


def test_the_cli_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["--limit", "3", "--top", "2", "--no-corpus", "--json", str(out)]) == 0
    printed = capsys.readouterr()
    report = json.loads(out.read_text())
    lex = report["lexicon"]
    assert lex["held_out"] == lex["candidates"] - len(lex["excluded"]) > 1000
    assert (lex["evaluated"], lex["positive"], lex["negative"]) == (6, 3, 3)
    assert report["lexicon_words"]["texts"] == 6 * len(FRAMES)
    assert len(report["sentences"]) == len(SENTENCES)
    trained = trained_words()
    assert report["trained_words"] == len(trained)
    assert [row["trained"] for row in report["sentences"]] == [
        word in trained for _, word, _ in SENTENCES
    ]
    assert [row["trained"] for row in report["words"]] == [
        row["word"] in trained for row in report["words"]
    ]
    assert report["by_training_frequency"] == {}
    for line in (
        f"{lex['held_out']} left",
        "evaluated: 6 words (3 positive, 3 negative) in 6 frames",
        "sign right, positive words",
        "Spearman credit vs valence",
        "AUC end score, pos vs neg",
        "lexicon words by frame",
        "rank 1: ",
        "worst misses: ",
    ):
        assert line in printed.out, line
    assert "by occurrences in the training tweets" not in printed.out
    assert "scored 36/36 texts" in printed.err


README = Path(__file__).resolve().parents[2] / "README.md"
WORD_TERM = Path(__file__).resolve().parents[2] / "docs/demo-rm-word-term.json"
_TABLE_ROWS = {
    "all": ("lexicon_words",),
    "not a training adjective": ("by_training", "untrained"),
    "a training adjective (new frames)": ("by_training", "trained"),
    "never in the training tweets": ("by_training_frequency", "unseen"),
    "the demo's own 18 probe words": ("probe_words",),
}


def _readme() -> str:
    return " ".join(README.read_text().split())


def _figures(report: dict[str, Any], name: str) -> dict[str, Any]:
    figures = report
    for key in _TABLE_ROWS[name]:
        figures = figures[key]
    return figures


@pytest.fixture(scope="module")
def shipped(demo: RewardModel) -> dict[str, Any]:
    """The whole evaluation of the shipped checkpoint, split by the training adjectives."""
    return evaluate_lexicon(demo, trained=split_words(0.3))


def test_the_readme_lexicon_figures_are_the_shipped_model_s(shipped: dict[str, Any]) -> None:
    text = _readme()
    words, rows = shipped["lexicon_words"], shipped["sentences"]
    dirty = next(row for row in rows if row["word"] == "dirty")
    for stated in (
        f"AUC **{words['auc']:.2f}** (its own 18 probe words in the same frames: "
        f"{shipped['probe_words']['auc']:.2f}), Spearman {words['spearman']:.2f}",
        f"positive credit {words['sign_positive']:.0%} of the time",
        f"those seen 10 or more times reach AUC "
        f"{shipped['by_training_frequency']['10+']['auc']:.2f}",
        f"right sign in {sum(r['credit'] * r['sign'] > 0 for r in rows)} and is the "
        f"sentence's largest in {sum(r['rank'] == 1 for r in rows)}; "
        f'"dirty" gets {dirty["credit"]:+.2f}',
        f"{shipped['lexicon']['evaluated']:,} words of the VADER sentiment lexicon",
    ):
        assert stated in text, stated


def _table() -> list[tuple[str, ...]]:
    return re.findall(
        r"^  \| ([^|]+?) \| ([\d,]+) \| \**([\d.]+)\** \| ([\d.]+) \| ([\d.]+) \|$",
        README.read_text(),
        flags=re.M,
    )


def test_the_readme_word_term_table_is_its_report_and_the_shipped_model_s(
    shipped: dict[str, Any],
) -> None:
    """The word-term model's columns are its committed report (a checkpoint not shipped,
    rebuilt by ``make demo-model ARGS=...``); the last column is re-measured here."""
    document = json.loads(WORD_TERM.read_text())
    report = document["word_term_model"]["lexicon"]
    rows = _table()
    assert [row[0] for row in rows] == list(_TABLE_ROWS)
    for name, words, auc, rank_correlation, shipped_auc in rows:
        figures = _figures(report, name)
        assert figures["words"] == int(words.replace(",", "")), name
        assert f"{figures['auc']:.2f}" == auc, name
        assert f"{figures['spearman']:.2f}" == rank_correlation, name
        assert f"{_figures(shipped, name)['auc']:.2f}" == shipped_auc, name
        assert _figures(document["shipped_model_same_split"], name) == pytest.approx(
            _figures(shipped, name)
        )
    assert report["trained_words"] == len(split_words(0.3)) == 861
    sentences = report["sentences"]
    heldout = document["word_term_model"]["training_report"]["heldout"]
    recipe = document["word_term_model"]["training_report"]["recipe"]
    text = _readme()
    for stated in (
        f"the word is the largest credit in {sum(r['rank'] == 1 for r in sentences)} "
        f"({sum(r['rank'] == 1 for r in shipped['sentences'])})",
        f"negative: {heldout['pos_vs_neg']:.3f} (",
        f'ARGS="--word-weight {recipe["word_weight"]:g} --rm-epochs {recipe["rm_epochs"]:g}"',
    ):
        assert stated in text, stated


def test_the_readme_states_the_held_out_accuracy_of_the_report() -> None:
    heldout = json.loads((MODEL_DIR / "report.json").read_text())["heldout"]
    stated = re.search(
        r"positive vs negative \*\*([\d.]+)\*\*, positive vs neutral ([\d.]+), "
        r"neutral vs negative (\d\.\d+)",
        _readme(),
    )
    assert stated is not None
    assert stated.groups() == tuple(
        f"{heldout[key]:.3f}" for key in ("pos_vs_neg", "pos_vs_neu", "neu_vs_neg")
    )
