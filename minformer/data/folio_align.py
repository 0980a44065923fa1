"""Alignment of two editions of a play: speeches first, then segments inside aligned speeches.

Three steps, each comparing spelling-folded text (``fold_word``: lower case, letters only, "&"
read as "and", u/v, i/j and i/y merged, doubled letters single, a final "e" dropped), so that
the First Folio's "vnfold your selfe" and the modern "unfold yourself" compare as near-equal:

1. Speeches. A dynamic program in the style of Gale and Church (1993), "A program for aligning
   sentences in bilingual corpora", aligns the two speech sequences monotonically with the moves
   1-1, 1-0, 0-1, 2-1 and 1-2. A 1-1 or merged move scores ``dice - SPEECH_MATCH_COST`` (Dice
   coefficient of the two sides' sets of character trigrams), a skipped speech scores 0, and the
   path with the highest total wins. Only cells near a line through anchors are filled. Anchors
   are long speech pairs that are each other's best match, and only the longest chain of them
   that increases on both sides is used. So a passage missing from one edition does not pull
   the band away from the true path.
2. Words. Inside each aligned group, ``difflib.SequenceMatcher`` matches the folded words
   exactly. Then a gap with the same number of words on both sides (at most ``MAX_GAP_PAIR``) is
   paired word by word where the folded spellings are close.
3. Segments. A cut between two words is allowed where both words on both sides are matched to
   each other (an anchor). Every anchor at a line end on both sides is cut (verse lines), an
   anchor at punctuation on both sides once the segment has ``MIN_PUNCT_SEGMENT`` characters, and
   any anchor once it has ``MIN_PLAIN_SEGMENT`` characters (prose). A segment never contains a
   speaker label, a stage direction or a bracketed note, and it is kept only if it passes the
   checks of ``confident``.

The edition-specific parsing (speaker labels, stage directions) lives in ``minformer.data.folio``;
this module works only on speeches made of tokens with character offsets.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import re
from collections.abc import Sequence

import numpy as np
from scipy import sparse

METHOD_VERSION = 1
"""Increased whenever a rule or threshold below changes, so that stored pairs name the method that made them."""

SPEECH_MATCH_COST = 0.3
"""Subtracted from the trigram Dice of an aligned speech group: a pair below it is never aligned."""
SPEECH_MERGE_COST = 0.05
"""Extra cost of a 2-1 or 1-2 group, so that a 1-1 group wins when both explain the text."""
SPEECH_BAND = 30
"""Half-width, in speeches, of the dynamic program's band around the line through the anchors."""
ANCHOR_MIN_DICE = 0.6
"""Minimum trigram Dice of an anchor: a speech pair that fixes the band before the program runs."""
ANCHOR_MIN_CHARS = 60
"""Minimum folded length, in characters, of the Folio speech of an anchor."""
MAX_GAP_PAIR = 4
"""Maximum length of a run of unmatched words paired word by word when both sides have the same count."""
MIN_GAP_WORD_RATIO = 0.5
"""Minimum ``difflib`` ratio of two folded words paired inside a gap."""
MIN_PUNCT_SEGMENT = 40
"""Minimum length, in Folio characters, of a segment ended at punctuation that is not a line end."""
MIN_PLAIN_SEGMENT = 160
"""Minimum length, in Folio characters, of a segment ended at an anchor with no punctuation."""
MIN_SEGMENT_RATIO = 0.75
"""Minimum ``difflib`` ratio of the two sides' folded texts for a kept segment."""
MIN_MATCHED_SHARE = 0.6
"""Minimum share of the words on each side matched by step 2, for a kept segment."""
MAX_INSERTION = 1
"""Maximum number of words that one side of a kept segment may have beyond the other between two matches."""
LENGTH_RATIO_RANGE = (0.67, 1.5)
"""Allowed range of len(folio text) / len(modern text), in characters, for a kept segment."""
MAX_SEGMENT_CHARS = 400
"""Maximum length of a kept segment, in characters, on either side."""

_NOT_LETTER = re.compile(r"[^a-z]")
_DOUBLED = re.compile(r"(.)\1+")
_WORD = re.compile(r"[^\s-]+(?:-[^\s-]+)*")
_BARRIER = re.compile(r"[A-Za-z0-9\[\]]")
_PUNCT = re.compile(r"[.,;:?!]")


def fold_word(word: str) -> str:
    """Fold a word's spelling so that Folio and modern spellings of it mostly become equal."""
    folded = _NOT_LETTER.sub("", word.lower().replace("&", "and"))
    folded = folded.replace("v", "u").replace("j", "i").replace("y", "i")
    folded = _DOUBLED.sub(r"\1", folded)
    if len(folded) > 2 and folded.endswith("e"):
        folded = folded[:-1]
    return folded


@dataclasses.dataclass(frozen=True)
class Token:
    """A word of a speech: its character offsets in the document and its folded spelling."""

    start: int
    end: int
    folded: str


@dataclasses.dataclass(frozen=True)
class Speech:
    """A speech of one edition: its speaker label and the words of its text, in order."""

    speaker: str
    tokens: tuple[Token, ...]

    @property
    def folded(self) -> str:
        return " ".join(token.folded for token in self.tokens if token.folded)


@dataclasses.dataclass(frozen=True)
class SpeechGroup:
    """An aligned group: one or two Folio speeches with one or two modern ones (never 2-2)."""

    folio: tuple[int, ...]
    modern: tuple[int, ...]
    dice: float


@dataclasses.dataclass(frozen=True)
class Segment:
    """A candidate pair: a run of words on each side, given as document character offsets."""

    folio_start: int
    folio_end: int
    modern_start: int
    modern_end: int
    ratio: float
    matched_share: float
    longest_insertion: int
    kept: bool


def tokenize(text: str, spans: Sequence[tuple[int, int]]) -> tuple[Token, ...]:
    """Split the given character spans of ``text`` into words (runs of non-space, with "--" and
    lone hyphens as separators)."""
    tokens = []
    for span_start, span_end in spans:
        for match in _WORD.finditer(text, span_start, span_end):
            tokens.append(Token(match.start(), match.end(), fold_word(match.group())))
    return tuple(tokens)


# ---- step 1: speeches ----------------------------------------------------------------------


def _trigram_ids(text: str, vocabulary: dict[str, int]) -> set[int]:
    """Ids of the character trigrams of a text padded with a space on both sides."""
    padded = f" {text} "
    return {vocabulary.setdefault(padded[index:index + 3], len(vocabulary))
            for index in range(len(padded) - 2)}


def _incidence(gram_sets: list[set[int]], width: int) -> sparse.csr_matrix:
    """Binary (text, trigram) matrix."""
    rows = [row for row, grams in enumerate(gram_sets) for _ in grams]
    columns = [gram for grams in gram_sets for gram in grams]
    return sparse.csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(gram_sets), width))


def _dice_matrix(left: list[set[int]], right: list[set[int]], width: int) -> np.ndarray:
    """Dice coefficient 2|A∩B| / (|A| + |B|) of the trigram sets, for every (left, right) pair."""
    shared = (_incidence(left, width) @ _incidence(right, width).T).toarray()  # (len(left), len(right))
    sizes = np.array([len(grams) for grams in left])[:, None] + np.array([len(grams) for grams in right])
    return np.divide(2.0 * shared, sizes, out=np.zeros_like(shared), where=sizes > 0)


def _anchors(one_one: np.ndarray, folio_texts: list[str]) -> list[tuple[int, int]]:
    """Pairs (i, j) that are each other's best match, long and similar, kept in a chain that
    increases in both i and j (the longest such chain)."""
    best_modern = one_one.argmax(axis=1)
    best_folio = one_one.argmax(axis=0)
    candidates = [(i, int(j)) for i, j in enumerate(best_modern)
                  if best_folio[j] == i and one_one[i, j] >= ANCHOR_MIN_DICE
                  and len(folio_texts[i]) >= ANCHOR_MIN_CHARS]
    return _longest_increasing_chain(candidates)


def _longest_increasing_chain(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The longest subsequence of ``pairs`` (sorted by i, distinct i) whose j strictly increases."""
    tails: list[int] = []  # tails[k]: index in pairs of the smallest last j of a chain of length k+1
    previous: list[int | None] = [None] * len(pairs)
    for index, (_, j) in enumerate(pairs):
        low, high = 0, len(tails)
        while low < high:
            middle = (low + high) // 2
            if pairs[tails[middle]][1] < j:
                low = middle + 1
            else:
                high = middle
        previous[index] = tails[low - 1] if low > 0 else None
        if low == len(tails):
            tails.append(index)
        else:
            tails[low] = index
    chain, cursor = [], tails[-1] if tails else None
    while cursor is not None:
        chain.append(pairs[cursor])
        cursor = previous[cursor]
    return chain[::-1]


def _band(n_folio: int, n_modern: int, anchors: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each Folio prefix length i, the range of modern prefix lengths the program fills: a
    band around the line through the anchors (and the two corners)."""
    points = [(0, 0)] + [(i + 1, j + 1) for i, j in anchors] + [(n_folio, n_modern)]
    rows = [i for i, _ in points]
    centres = np.interp(np.arange(n_folio + 1), rows, [j for _, j in points])
    bounds = []
    for i, centre in enumerate(centres):
        # Between two anchors the band also spans every j that lies between them.
        following = bisect.bisect_left(rows, i)
        previous = following if rows[following] == i else following - 1
        low = min(int(centre) - SPEECH_BAND, points[previous][1])
        high = max(int(centre) + SPEECH_BAND, points[following][1])
        bounds.append((max(0, low), min(n_modern, high)))
    return bounds


def align_speeches(folio: Sequence[Speech], modern: Sequence[Speech]) -> list[SpeechGroup]:
    """Align two speech sequences monotonically (moves 1-1, 1-0, 0-1, 2-1, 1-2) and return the
    aligned groups in order. Skipped speeches belong to no group."""
    # Limitation: of two speeches printed in opposite orders, only one can be aligned.
    folio_texts = [speech.folded for speech in folio]
    modern_texts = [speech.folded for speech in modern]
    if not folio_texts or not modern_texts:
        return []

    # A 2-1 or 1-2 group is scored on the union of the trigram sets of its two speeches.
    vocabulary: dict[str, int] = {}
    folio_grams = [_trigram_ids(text, vocabulary) for text in folio_texts]
    modern_grams = [_trigram_ids(text, vocabulary) for text in modern_texts]
    folio_pairs = [a | b for a, b in zip(folio_grams, folio_grams[1:])]
    modern_pairs = [a | b for a, b in zip(modern_grams, modern_grams[1:])]
    width = len(vocabulary)
    one_one = _dice_matrix(folio_grams, modern_grams, width)
    two_one = _dice_matrix(folio_pairs, modern_grams, width) if folio_pairs else None
    one_two = _dice_matrix(folio_grams, modern_pairs, width) if modern_pairs else None

    n_folio, n_modern = len(folio), len(modern)
    bounds = _band(n_folio, n_modern, _anchors(one_one, folio_texts))
    best: dict[tuple[int, int], tuple[float, tuple[int, int]]] = {(0, 0): (0.0, (0, 0))}

    # Each cell (i, j) contains the best total for the first i Folio and j modern speeches, and the
    # move (di, dj) that reached it.
    for i in range(n_folio + 1):
        low, high = bounds[i]
        for j in range(low, high + 1):
            if i == 0 and j == 0:
                continue
            candidates = []
            for di, dj in ((1, 0), (0, 1), (1, 1), (2, 1), (1, 2)):
                previous = best.get((i - di, j - dj))
                if previous is None:
                    continue
                gain = 0.0
                if di and dj:
                    gain = _group_dice(one_one, two_one, one_two, i, j, di, dj) - SPEECH_MATCH_COST
                    if di + dj == 3:
                        gain -= SPEECH_MERGE_COST
                candidates.append((previous[0] + gain, (di, dj)))
            if candidates:
                best[(i, j)] = max(candidates)

    if (n_folio, n_modern) not in best:
        raise RuntimeError("speech alignment band does not reach the end of both plays")
    return _trace_back(best, one_one, two_one, one_two, n_folio, n_modern)


def _group_dice(one_one, two_one, one_two, i: int, j: int, di: int, dj: int) -> float:
    if (di, dj) == (1, 1):
        return float(one_one[i - 1, j - 1])
    if (di, dj) == (2, 1):
        return float(two_one[i - 2, j - 1])
    return float(one_two[i - 1, j - 2])


def _trace_back(best, one_one, two_one, one_two, n_folio: int, n_modern: int) -> list[SpeechGroup]:
    groups = []
    i, j = n_folio, n_modern
    while (i, j) != (0, 0):
        di, dj = best[(i, j)][1]
        if di and dj:
            dice = _group_dice(one_one, two_one, one_two, i, j, di, dj)
            groups.append(SpeechGroup(tuple(range(i - di, i)), tuple(range(j - dj, j)), dice))
        i, j = i - di, j - dj
    groups.reverse()
    return groups


# ---- step 2: words -------------------------------------------------------------------------


def match_words(folio: Sequence[Token], modern: Sequence[Token]) -> list[int | None]:
    """For each Folio token, the index of the modern token it is matched to, or None."""
    folio_words = [token.folded or "\0" for token in folio]
    modern_words = [token.folded or "\1" for token in modern]
    matcher = difflib.SequenceMatcher(None, folio_words, modern_words, autojunk=False)
    matches: list[int | None] = [None] * len(folio)

    folio_next, modern_next = 0, 0
    for block in matcher.get_matching_blocks():
        _pair_gap(folio_words, modern_words, folio_next, block.a, modern_next, block.b, matches)
        for offset in range(block.size):
            matches[block.a + offset] = block.b + offset
        folio_next, modern_next = block.a + block.size, block.b + block.size
    return matches


def _pair_gap(folio_words, modern_words, folio_start, folio_end, modern_start, modern_end,
              matches) -> None:
    """Pair the words of a gap one by one if both sides have the same count and close spellings."""
    count = folio_end - folio_start
    if count == 0 or count != modern_end - modern_start or count > MAX_GAP_PAIR:
        return
    for offset in range(count):
        ratio = difflib.SequenceMatcher(None, folio_words[folio_start + offset],
                                        modern_words[modern_start + offset]).ratio()
        if ratio >= MIN_GAP_WORD_RATIO:
            matches[folio_start + offset] = modern_start + offset


# ---- step 3: segments ----------------------------------------------------------------------


def segment_group(folio_text: str, modern_text: str, folio: Sequence[Token],
                  modern: Sequence[Token]) -> list[Segment]:
    """Cut an aligned group into segments at anchors and judge each one with ``confident``."""
    matches = match_words(folio, modern)
    anchored = [index for index, match in enumerate(matches) if match is not None]
    if not anchored:
        return []

    segments = []
    start = anchored[0]
    for index in range(start, anchored[-1]):
        if not _is_anchor_cut(matches, index):
            continue
        length = folio[index].end - folio[start].start
        kind = _cut_kind(folio_text, modern_text, folio, modern, index, matches[index])
        if (kind == "line" or (kind == "punct" and length >= MIN_PUNCT_SEGMENT)
                or length >= MIN_PLAIN_SEGMENT or kind == "barrier"):
            segments.append(_make_segment(folio_text, modern_text, folio, modern, matches,
                                          start, index))
            start = index + 1
    segments.append(_make_segment(folio_text, modern_text, folio, modern, matches, start,
                                  anchored[-1]))
    return segments


def _is_anchor_cut(matches: list[int | None], index: int) -> bool:
    """Return whether the cut after Folio word ``index`` is an anchor: that word and the next are
    matched to two consecutive modern words."""
    current_match, next_match = matches[index], matches[index + 1]
    return current_match is not None and next_match is not None and next_match == current_match + 1


def _cut_kind(folio_text, modern_text, folio, modern, folio_index: int, modern_index: int) -> str:
    folio_gap = folio_text[folio[folio_index].start:folio[folio_index + 1].start]
    modern_gap = modern_text[modern[modern_index].start:modern[modern_index + 1].start]
    if _has_barrier(folio_text, folio, folio_index) or _has_barrier(modern_text, modern,
                                                                     modern_index):
        return "barrier"
    if "\n" in folio_gap and "\n" in modern_gap:
        return "line"
    if _PUNCT.search(folio_gap) and _PUNCT.search(modern_gap):
        return "punct"
    return "plain"


def _has_barrier(text: str, tokens: Sequence[Token], index: int) -> bool:
    """Return whether a letter, digit or bracket lies between token ``index`` and the next. That is
    a speaker label, a stage direction or a bracketed note, and no segment may contain one."""
    return bool(_BARRIER.search(text, tokens[index].end, tokens[index + 1].start))


def _make_segment(folio_text, modern_text, folio, modern, matches, first: int, last: int) -> Segment:
    modern_first, modern_last = matches[first], matches[last]
    folio_words = folio[first:last + 1]
    modern_words = modern[modern_first:modern_last + 1]
    barrier = (any(_has_barrier(folio_text, folio, index) for index in range(first, last))
               or any(_has_barrier(modern_text, modern, index)
                      for index in range(modern_first, modern_last)))

    folio_folded = " ".join(token.folded for token in folio_words)
    modern_folded = " ".join(token.folded for token in modern_words)
    ratio = difflib.SequenceMatcher(None, folio_folded, modern_folded, autojunk=False).ratio()
    n_matched = sum(match is not None for match in matches[first:last + 1])
    matched_share = min(n_matched / len(folio_words), n_matched / len(modern_words))

    folio_start, folio_end = folio_words[0].start, folio_words[-1].end
    modern_start, modern_end = modern_words[0].start, modern_words[-1].end
    segment = Segment(folio_start, folio_end, modern_start, modern_end, ratio, matched_share,
                      _longest_insertion(matches, first, last), kept=False)
    if barrier or not confident(segment, segment_text(folio_text, folio_start, folio_end),
                                segment_text(modern_text, modern_start, modern_end)):
        return segment
    return dataclasses.replace(segment, kept=True)


def _longest_insertion(matches: list[int | None], first: int, last: int) -> int:
    """Return the largest difference in word count between the two sides of an unmatched stretch.
    Such words are present on one side only, like a stage direction inside a Folio line."""
    longest, previous = 0, (first, matches[first])
    for index in range(first + 1, last + 1):
        if matches[index] is None:
            continue
        folio_gap = index - previous[0] - 1
        modern_gap = matches[index] - previous[1] - 1
        longest = max(longest, abs(folio_gap - modern_gap))
        previous = (index, matches[index])
    return longest


def confident(segment: Segment, folio_text: str, modern_text: str) -> bool:
    """Decide whether a segment is kept: folded texts close, most words matched, no words added
    on one side only, similar lengths, and neither side too long."""
    if segment.ratio < MIN_SEGMENT_RATIO or segment.matched_share < MIN_MATCHED_SHARE:
        return False
    if segment.longest_insertion > MAX_INSERTION:
        return False
    if max(len(folio_text), len(modern_text)) > MAX_SEGMENT_CHARS or not modern_text:
        return False
    low, high = LENGTH_RATIO_RANGE
    return low <= len(folio_text) / len(modern_text) <= high


def segment_text(text: str, start: int, end: int) -> str:
    """Return the text of a pair's side: the document slice with each run of whitespace made one space."""
    return " ".join(text[start:end].split())
