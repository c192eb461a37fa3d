"""The lexicon evaluation of the demo RM: the published lexicon is found through its
distribution and read whole, the words the demo was tuned on are really left out, and a word's
credit is the service's token rewards summed over the word's tokens. The evaluation reports
figures; the floors the shipped model must keep are in ``test_demo_model.py``.
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
from tokenreward_service.demo.data import EXAMPLES, NEUTRAL, PROBES, hand_written_words
from tokenreward_service.demo.evaluate import credit, score_texts
from tokenreward_service.demo.lexicon import (
    FRAMES,
    NEUTRAL_SENTENCES,
    QUIET,
    SENTENCES,
    Placement,
    credit_figures,
    evaluate_lexicon,
    excluded_words,
    held_out_words,
    lexicon_path,
    load_lexicon,
    main,
    neutral_rows,
    place_words,
    read_texts,
    sentence_ranks,
    sentence_summary,
    spearman,
    split_words,
    trained_words,
    training_counts,
    word_credit,
)
from tokenreward_service.demo.words import load_polarities
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


def test_neutral_sentences_carry_no_sentiment_or_training_word(lexicon: dict[str, float]) -> None:
    polarities = load_polarities()
    hand_written = hand_written_words()
    function_words = {"the", "a", "at", "is", "was", "to", "my", "we", "i", "and", "with", "this"}
    assert len(set(NEUTRAL_SENTENCES)) == len(NEUTRAL_SENTENCES) >= 30
    for text in NEUTRAL_SENTENCES:
        words = _words(text)
        assert not [w for w in words if w in lexicon or w in polarities], text
        assert not [w for w in words if w in hand_written and w not in function_words], text
    assert not set(NEUTRAL_SENTENCES) & {text for text, _, _ in SENTENCES}


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


def test_neutral_rows_take_the_largest_reward_and_the_end_change(demo: RewardModel) -> None:
    texts = ["the bus leaves at seven", "she called her sister"]
    rows = neutral_rows(demo, texts)
    for row, reading in zip(rows, read_texts(demo, texts), strict=True):
        rewards = [r for _, r, _ in reading.tokens]
        assert row["text"] == reading.text
        assert abs(row["top_reward"]) == max(map(abs, rewards))
        assert (
            row["top"] == reading.tokens[[abs(r) for r in rewards].index(max(map(abs, rewards)))][0]
        )
        assert row["mean_abs"] == pytest.approx(sum(map(abs, rewards)) / len(rewards))
        assert row["score_change"] == pytest.approx(sum(rewards), abs=1e-5)


def test_sentence_summary_counts_what_it_says() -> None:
    sentences = [
        {"credit": 0.8, "sign": 1, "rank": 1, "score_change": 1.0},
        {"credit": -0.4, "sign": 1, "rank": 2, "score_change": -0.5},  # wrong sign
        {"credit": -0.2, "sign": -1, "rank": 3, "score_change": -2.0},
    ]
    # the words' median |credit| is 0.4: quiet below QUIET * 0.4
    neutral = [
        {"top_reward": 0.9 * QUIET * 0.4, "score_change": 0.1},
        {"top_reward": -1.1 * QUIET * 0.4, "score_change": -0.3},
        {"top_reward": 0.0, "score_change": 0.2},
    ]
    summary = sentence_summary(sentences, neutral)
    assert summary["sentences"] == summary["neutral_sentences"] == 3
    assert summary["sign_right"] == pytest.approx(2 / 3)
    assert summary["rank_1"] == pytest.approx(1 / 3)
    assert summary["mean_rank"] == 2.0
    assert summary["word_credit"] == pytest.approx(0.4)
    assert summary["neutral_quiet"] == pytest.approx(2 / 3)
    assert summary["neutral_top_over_word"] == pytest.approx(0.9 * QUIET)
    assert summary["neutral_change_over_word"] == pytest.approx(0.2 / 1.0)


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


def test_the_readme_counts_times_of_day_in_the_training_tweets() -> None:
    from tokenreward_service.demo.data import LABELS, load_corpus, split_by_text

    train, _ = split_by_text(load_corpus(), seed=0, heldout_fraction=0.1)
    times = [e.label for e in train if re.search(r"\d\s?pm\b", e.text.lower())]
    negative, positive = times.count(LABELS["negative"]), times.count(LABELS["positive"])
    assert negative > 10 * positive  # what makes "pm" negative to the RM
    stated = f"is in {negative} negative training tweets and {positive} positive ones"
    assert stated in _readme()


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
    assert [row["text"] for row in report["neutral_sentences"]] == list(NEUTRAL_SENTENCES)
    assert report["sentence_summary"] == sentence_summary(
        report["sentences"], report["neutral_sentences"]
    )
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
        "neutral sentences: the token of largest |reward|",
        NEUTRAL_SENTENCES[0],
        "quiet: ",
    ):
        assert line in printed.out, line
    assert "by occurrences in the training tweets" not in printed.out
    assert "scored 36/36 texts" in printed.err


README = Path(__file__).resolve().parents[2] / "README.md"
RECIPES = Path(__file__).resolve().parents[2] / "docs/demo-rm-recipes.json"
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
    summary = shipped["sentence_summary"]
    for stated in (
        f"AUC **{words['auc']:.2f}** (its own 18 probe words in the same frames: "
        f"{shipped['probe_words']['auc']:.2f}), Spearman {words['spearman']:.2f}",
        f"positive credit {words['sign_positive']:.0%} of the time",
        f"those seen 10 or more times reach AUC "
        f"{shipped['by_training_frequency']['10+']['auc']:.2f}",
        f"right sign in {sum(r['credit'] * r['sign'] > 0 for r in rows)} and is the "
        f"sentence's largest in {sum(r['rank'] == 1 for r in rows)}; "
        f'"dirty" gets {dirty["credit"]:+.2f}'.replace("-", "\u2212"),
        f"{shipped['lexicon']['evaluated']:,} words of the VADER sentiment lexicon",
        f"{round(summary['neutral_quiet'] * summary['neutral_sentences'])} are *quiet*",
    ):
        assert stated in text, stated


def _table() -> list[tuple[str, ...]]:
    return re.findall(
        r"^  \| ([^|]+?) \| ([\d,]+) \| \**([\d.]+)\** \| ([\d.]+) \| ([\d.]+) \|$",
        README.read_text(),
        flags=re.M,
    )


def test_the_readme_word_term_table_is_the_shipped_model_s_and_the_previous_one_s(
    shipped: dict[str, Any],
) -> None:
    """AUC and Spearman are re-measured on the shipped checkpoint; the last column is the
    checkpoint shipped before the word term, as measured in the committed recipe document."""
    document = json.loads(RECIPES.read_text())
    previous = document["previous_checkpoint"]["lexicon"]
    rows = _table()
    assert [row[0] for row in rows] == list(_TABLE_ROWS)
    for name, words, auc, rank_correlation, previous_auc in rows:
        figures = _figures(shipped, name)
        assert figures["words"] == int(words.replace(",", "")), name
        assert f"{figures['auc']:.2f}" == auc, name
        assert f"{figures['spearman']:.2f}" == rank_correlation, name
        assert f"{_figures(previous, name)['auc']:.2f}" == previous_auc, name
    assert shipped["trained_words"] == len(split_words(0.3)) == 861


def _recipe_rows() -> list[list[str]]:
    section = README.read_text().split("| recipe | seed |")[1].split("\n\n")[0]
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in section.splitlines()[2:]
        if line.strip().startswith("|")
    ]


def test_the_readme_seed_table_is_the_committed_recipe_document() -> None:
    """Every figure of the README's recipe-by-seed table is the committed document's, and the
    shipped checkpoint is the document's chosen recipe at seed 0 (same weights revision)."""
    document = json.loads(RECIPES.read_text())
    runs = document["runs"]
    rows = _recipe_rows()
    assert len(rows) == len(runs) >= 9
    for row, run in zip(rows, runs, strict=True):
        sentences = run["sentences"]
        assert row == [
            run["recipe"],
            str(run["seed"]),
            f"{run['heldout']['pos_vs_neg']:.3f}",
            f"{run['lexicon_auc_untrained']:.2f}",
            f"{round(sentences['sign_right'] * 40)} / {round(sentences['rank_1'] * 40)}",
            f"{round(sentences['neutral_quiet'] * sentences['neutral_sentences'])}",
            f"{run['degenerate_above_copy']['thanks']:.2f}",
        ]
    chosen = [run for run in runs if run["recipe"] == document["chosen"]]
    assert {run["seed"] for run in chosen} == {0, 1, 2}
    revision = load_reward_model(MODEL_DIR, device="cpu", dtype="float32").spec.revision
    assert next(run for run in chosen if run["seed"] == 0)["revision"] == revision
    recipe = json.loads((MODEL_DIR / "report.json").read_text())["recipe"]
    for key, value in chosen[0]["recipe_changes"].items():
        assert recipe[key] == value, key
    means = {name: recipe["mean_over_seeds"] for name, recipe in document["recipes"].items()}
    chosen_auc = means[document["chosen"]]["lexicon_auc_untrained"]
    # the rule: the best mean untrained-word AUC, its mean held-out accuracy kept within 0.01
    assert chosen_auc == max(m["lexicon_auc_untrained"] for m in means.values())
    held_out = means[document["chosen"]]["heldout_pos_vs_neg"]
    assert held_out >= means["previous"]["heldout_pos_vs_neg"] - 0.01
    text = _readme()
    for stated in (
        f"means {means[document['chosen']]['heldout_pos_vs_neg']:.3f} for the chosen recipe, "
        f"{means['previous']['heldout_pos_vs_neg']:.3f} before",
        f"mean AUC {means['word term, weight 1']['lexicon_auc_untrained']:.4f} and "
        f"{chosen_auc:.4f}",
        f"seed 0, trained on another machine) scored "
        f"{document['previous_checkpoint']['row']['heldout']['pos_vs_neg']:.3f} held-out",
    ):
        assert stated in text, stated
    # the README's degenerate-copy figures are the shipped checkpoint's (seed 0's) run
    shares = next(run for run in chosen if run["seed"] == 0)["degenerate_above_copy"]
    assert (
        f"its last words repeated three times {shares['repeat']:.2f}, its words shuffled "
        f"{shares['shuffle']:.2f}, five random words appended {shares['salad']:.2f}, and "
        f'" Thanks! Thanks! Thanks!" appended **{shares["thanks"]:.2f}**'
    ) in text


def test_the_readme_states_the_held_out_accuracy_and_training_time_of_the_report() -> None:
    report = json.loads((MODEL_DIR / "report.json").read_text())
    heldout = report["heldout"]
    stated = re.search(
        r"positive vs negative \*\*([\d.]+)\*\*, positive vs neutral ([\d.]+), "
        r"neutral vs negative (\d\.\d+)",
        _readme(),
    )
    assert stated is not None
    assert stated.groups() == tuple(
        f"{heldout[key]:.3f}" for key in ("pos_vs_neg", "pos_vs_neu", "neu_vs_neg")
    )
    seconds = round(report["seconds"]["total"])
    assert f"({seconds // 60} min {seconds % 60} s measured)" in _readme()
