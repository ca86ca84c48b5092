"""NTM: negative-transfer mitigation with a concept consistency graph (docs/METHOD.md §3).

Each sample is reduced to a few *concepts* (normalised key phrases of its instruction,
input and output). The concept consistency graph G has a node per concept and an edge
between two concepts that co-occurred in an accepted sample. A candidate whose known
concepts are (too often) not adjacent in G is held out as potentially conflicting.

Key phrases come from RAKE (Rose et al., 2010, "Automatic keyword extraction from individual
documents"), written here by hand because it must run offline and fast: rake-nltk needs NLTK
data downloaded at run time, YAKE took ~3 minutes per 10K samples in the prototype, and a
spaCy model is a download too. RAKE is a few regular expressions plus word counts, and the
stop-word list is scikit-learn's ENGLISH_STOP_WORDS, already a dependency.

Default settings were chosen from measurements (``benchmarks/ntm_threshold.py`` on the
embedded pool); the numbers and the reasoning are in the comment above the defaults below.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import combinations
from typing import Any, Iterable, Sequence

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from tqdm.auto import tqdm

# ----------------------------------------------------------------------------- defaults
# Chosen from measurements (benchmarks/ntm_threshold.py; embedded pool, 4,000 records:
# 2,340 general, 911 math, 749 code; random order; "window" = rejection rate among the
# candidates seen between the 1,000th and the 2,000th acceptance):
#
#   phrases per sample              tau=0: rejected of 4000, window   tau=0.75: rejected, window   code rej. (0.75)
#   reference (top-10, code kept)   2,456, 63 % (stalls before 2,000)  1,847, 49 %                 36 %
#   top-10                          2,437, 61 % (stalls before 2,000)  1,922, 51 %                 42 %
#   top-5                           1,284, 36 %                          945, 25 %                 47 %
#   top-10 multi-word                 446, 10.5 %                        395,  9.6 %               14 %
#   top-5 multi-word (default)        236,  4.8 %                        207,  3.9 %               13 %
#   (tau=0.5 is within 3 % of tau=0 everywhere; grouped-by-capability order gives the same picture.)
#   Code samples: top-5 multi-word at tau=0 rejected 38 % of them with code kept in the text,
#   19 % with code lines stripped (prose_only), 15 % with INSTRUCTION_STOP_WORDS as well.
#
# Of the rejected samples we inspected (dozens, every setting), none was a genuine conflict:
# the rule rejects *new combinations of known concepts* ("positive integer" + "recursive
# function", "shell script" + "text file", ("number", "sort")), i.e. ordinary diversity.
# Single words are generic ("write", "list", "number"), become known at once, and make the
# strict rule reject most of the pool; the number of concepts per sample matters far more than
# tau, and tau <= 0.5 behaves like tau = 0 (most candidates have one or two known pairs, so the
# share is 0 or 1). So the default is the least rejecting setting that still applies the
# paper's rule: the top 5 multi-word phrases, and tau = 0.75 (a candidate is held out when more
# than three quarters of its known concept pairs were never seen together). It rejects ~5 %
# of candidates, and since select_with_budget passes a rejected sample's slot on to the next
# candidate of the same cluster, the budget per capability is kept; only which samples fill it
# changes. The reference rule is threshold=0, max_phrases=10, multiword_only=False,
# strip_code=False, instruction_stop_words=False.
DEFAULT_MAX_PHRASES = 5
DEFAULT_MULTIWORD_ONLY = True
DEFAULT_THRESHOLD = 0.75
DEFAULT_MAX_WORDS = 4  # longer runs of content words are dropped: they never recur as concepts
DEFAULT_MAX_CHARS = 4000  # per field: bounds time on essays and code dumps
MAX_CONCEPTS_PER_SAMPLE = 16  # caps the pairs the graph adds per sample at 120

# ----------------------------------------------------------------------------- RAKE

_STOP = frozenset(ENGLISH_STOP_WORDS)
# Words of the instruction-data genre that frame a task without naming a concept ("the
# following sentence", "a given string", "write a ..."). Measured on the embedded pool: with
# these as stop words, multi-word phrases such as "given string" / "following sentence" stop
# being concepts, and NTM's rejections of code samples fell (see benchmarks/ntm_threshold.py).
INSTRUCTION_STOP_WORDS = frozenset(
    "given following write create generate provide provided use using make input output "
    "example answer response task instruction explain describe".split()
)
# Anything that is not a letter, a space, an apostrophe or a hyphen ends a candidate phrase
# (RAKE's "phrase delimiters": punctuation, digits, symbols, line breaks).
_DELIM = re.compile(r"[^a-z\s'\-]+")
_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_CODE_CHARS = frozenset("{}()[];=<>$_\\|@`")
_WORD = re.compile(r"[a-z]+")
_GSM_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s")


def _is_code_line(line: str) -> bool:
    """A line that reads as source code rather than prose.

    Measured on the embedded pool: without this filter, code samples' key phrases were
    syntax ("int main", "using namespace std", "public static void main"), and NTM rejected
    code samples 2-6 times as often as the others (it would have shifted the budget away
    from code for no semantic reason). Heuristic: indented (and not a list item), or dense
    in code punctuation with fewer than 3 stop words (prose with arithmetic, such as GSM8K's
    "Now add in the fee $90 + $20 = $110", has plenty of stop words and is kept).
    """
    stripped = line.strip()
    if not stripped:
        return False
    if line[:1] in (" ", "\t") and not _BULLET.match(line):
        return True
    n_code = sum(ch in _CODE_CHARS for ch in stripped)
    if n_code < 1 or n_code < 0.04 * len(stripped.replace(" ", "")):
        return False
    n_stop = sum(w in _STOP for w in _WORD.findall(stripped.lower()))
    return n_stop < 3


def prose_only(text: str) -> str:
    """``text`` without fenced code blocks and code-like lines (see :func:`_is_code_line`)."""
    if not text:
        return text
    text = _GSM_CALC.sub("", _FENCE.sub("\n", text))
    return "\n".join(line for line in text.splitlines() if not _is_code_line(line))


def _normalise_word(w: str) -> str:
    """Light plural stripping so that "numbers" and "number" are one concept.

    Deliberately conservative (no stemmer offline that we trust more): "-sses/-ches/-shes/-xes"
    lose "es", other words longer than 3 letters lose a final "s" unless they end in
    "ss", "us", "is" or "ies".
    """
    if len(w) <= 3 or not w.endswith("s"):
        return w
    if w.endswith(("ss", "us", "is", "ies")):
        return w
    if w.endswith(("sses", "ches", "shes", "xes")):
        return w[:-2]
    return w[:-1]


DEFAULT_STOP_WORDS = _STOP | INSTRUCTION_STOP_WORDS


def _clean_word(w: str, stop_words: frozenset[str]) -> str | None:
    """A content word, or None when the token is a stop word / too short / a contraction."""
    w = w.strip("'-")
    if w.endswith("'s"):
        w = w[:-2]
    if len(w) < 2 or w in stop_words or "'" in w:
        # Contractions ("don't", "it's" after stripping) are function words.
        return None
    return w


def candidate_phrases(
    text: str, max_words: int = DEFAULT_MAX_WORDS, stop_words: frozenset[str] = DEFAULT_STOP_WORDS
) -> list[list[str]]:
    """RAKE's candidate phrases: maximal runs of content words between delimiters and stop words."""
    phrases: list[list[str]] = []
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    for fragment in _DELIM.split(text):
        current: list[str] = []
        for tok in fragment.split():
            w = _clean_word(tok, stop_words)
            if w is None:
                if current:
                    phrases.append(current)
                    current = []
            else:
                current.append(w)
        if current:
            phrases.append(current)
    return [p for p in phrases if len(p) <= max_words]


def rake(
    text: str,
    max_phrases: int = DEFAULT_MAX_PHRASES,
    max_words: int = DEFAULT_MAX_WORDS,
    stop_words: frozenset[str] = DEFAULT_STOP_WORDS,
) -> list[str]:
    """Top key phrases of ``text`` by RAKE score, best first, normalised and unique.

    Word score = degree / frequency (degree: the summed length of the candidate phrases the
    word occurs in, itself included); phrase score = the sum of its word scores. Phrases are
    then lower-cased, whitespace-collapsed and plural-stripped; equal phrases keep their best
    score; ties go to the phrase seen first.
    """
    phrases = candidate_phrases(text, max_words, stop_words)
    if not phrases:
        return []
    freq: dict[str, int] = {}
    degree: dict[str, int] = {}
    for p in phrases:
        n = len(p)
        for w in p:
            freq[w] = freq.get(w, 0) + 1
            degree[w] = degree.get(w, 0) + n
    best: dict[str, tuple[float, int]] = {}
    for pos, p in enumerate(phrases):
        score = sum(degree[w] / freq[w] for w in p)
        key = " ".join(_normalise_word(w) for w in p)
        old = best.get(key)
        if old is None or score > old[0]:
            best[key] = (score, old[1] if old else pos)
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))
    return [k for k, _ in ranked[:max_phrases]]


def _fields(rec: Any) -> tuple[str, str, str]:
    if isinstance(rec, str):
        return rec, "", ""
    if isinstance(rec, Mapping):
        return str(rec.get("instruction", "") or ""), str(rec.get("input", "") or ""), str(rec.get("output", "") or "")
    return rec.instruction or "", rec.input or "", rec.output or ""


def record_concepts(
    rec: Any,
    max_phrases: int = DEFAULT_MAX_PHRASES,
    multiword_only: bool = DEFAULT_MULTIWORD_ONLY,
    max_words: int = DEFAULT_MAX_WORDS,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    strip_code: bool = True,
    instruction_stop_words: bool = True,
) -> list[str]:
    """Concepts of one sample: RAKE over instruction, input and output as one document.

    The three fields are one document (a phrase never crosses a field boundary, the line
    break between them is a delimiter) so that "top-n per sample" is what the graph sees.
    ``strip_code`` drops code from input and output (:func:`prose_only`);
    ``instruction_stop_words`` adds :data:`INSTRUCTION_STOP_WORDS` to scikit-learn's list.
    """
    stop = DEFAULT_STOP_WORDS if instruction_stop_words else _STOP
    ins, inp, out = _fields(rec)
    if max_chars is not None:
        ins, inp, out = ins[:max_chars], inp[:max_chars], out[:max_chars]
    if strip_code:
        # Code in the input and output is syntax, not concepts; the instruction is kept whole
        # (it states the task in prose, inline code there is short).
        inp, out = prose_only(inp), prose_only(out)
    parts = (ins, inp, out)
    text = "\n".join(p for p in parts if p)
    if multiword_only:
        # Rank all phrases, keep the multi-word ones: a multi-word phrase's RAKE score does
        # not depend on the single words around it being kept.
        phrases = [p for p in rake(text, 10**9, max_words, stop) if " " in p]
        return phrases[:max_phrases]
    return rake(text, max_phrases, max_words, stop)


def extract_concepts(
    records: Iterable[Any],
    max_phrases: int = DEFAULT_MAX_PHRASES,
    multiword_only: bool = DEFAULT_MULTIWORD_ONLY,
    max_words: int = DEFAULT_MAX_WORDS,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    strip_code: bool = True,
    instruction_stop_words: bool = True,
    progress: bool = True,
) -> list[list[str]]:
    """Concepts per record (Record objects, dicts with instruction/input/output, or strings)."""
    records = list(records)
    it = tqdm(records, desc="NTM key phrases", unit="rec", disable=not progress or len(records) < 20000)
    return [
        record_concepts(r, max_phrases, multiword_only, max_words, max_chars, strip_code, instruction_stop_words)
        for r in it
    ]


# ----------------------------------------------------------------------------- graph


class ConceptConsistencyGraph:
    """Concepts as nodes, co-occurrence in an accepted sample as edges.

    Concepts are interned to ints and adjacency is a list of Python sets: membership tests
    are O(1), memory grows with the number of distinct edges (bounded per sample by
    ``max_concepts``), and no N x N or concept x concept matrix is ever formed, so 100K+
    samples stay cheap. A candidate only ever looks at its own concept pairs.
    """

    def __init__(self, max_concepts: int = MAX_CONCEPTS_PER_SAMPLE):
        if max_concepts < 1:
            raise ValueError("max_concepts must be at least 1")
        self.max_concepts = max_concepts
        self._index: dict[str, int] = {}
        self._names: list[str] = []
        self._adj: list[set[int]] = []
        self._n_edges = 0
        self.n_samples = 0

    # -- queries
    def __contains__(self, concept: str) -> bool:
        return concept in self._index

    def __len__(self) -> int:
        return len(self._names)

    @property
    def n_nodes(self) -> int:
        return len(self._names)

    @property
    def n_edges(self) -> int:
        return self._n_edges

    def adjacent(self, a: str, b: str) -> bool:
        ia, ib = self._index.get(a), self._index.get(b)
        return ia is not None and ib is not None and ib in self._adj[ia]

    def _unique(self, concepts: Iterable[str]) -> list[str]:
        seen: dict[str, None] = {}
        for c in concepts:
            if c and c not in seen:
                seen[c] = None
                if len(seen) == self.max_concepts:
                    break
        return list(seen)

    def _known_pairs(self, concepts: Iterable[str]) -> tuple[int, list[tuple[str, str]]]:
        known = [(c, self._index[c]) for c in self._unique(concepts) if c in self._index]
        n_pairs = len(known) * (len(known) - 1) // 2
        bad = [(a, b) for (a, ia), (b, ib) in combinations(known, 2) if ib not in self._adj[ia]]
        return n_pairs, bad

    def conflicting_pairs(self, concepts: Iterable[str]) -> list[tuple[str, str]]:
        """The candidate's concept pairs that are both in G but not adjacent."""
        return self._known_pairs(concepts)[1]

    def conflict_share(self, concepts: Iterable[str]) -> float:
        """Share of the candidate's known pairs (both concepts in G) that are not adjacent.

        0.0 when fewer than two of its concepts are known: nothing to contradict.
        """
        n_pairs, bad = self._known_pairs(concepts)
        return len(bad) / n_pairs if n_pairs else 0.0

    def is_consistent(self, concepts: Iterable[str], threshold: float = DEFAULT_THRESHOLD) -> bool:
        """Accept iff the conflict share is at most ``threshold``.

        threshold 0 is the reference rule (any known non-adjacent pair rejects); 1 accepts all.
        """
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"NTM threshold must be in [0, 1], got {threshold}")
        return self.conflict_share(concepts) <= threshold

    # -- update
    def add(self, concepts: Iterable[str]) -> None:
        """Add an accepted sample: its concepts as nodes, every pair of them as an edge."""
        ids = []
        for c in self._unique(concepts):
            i = self._index.get(c)
            if i is None:
                i = len(self._names)
                self._index[c] = i
                self._names.append(c)
                self._adj.append(set())
            ids.append(i)
        for a, b in combinations(ids, 2):
            if b not in self._adj[a]:
                self._adj[a].add(b)
                self._adj[b].add(a)
                self._n_edges += 1
        self.n_samples += 1


class NTMGate:
    """The NTM acceptance gate for :func:`paser.select.budget.select_with_budget`.

    ``gate(i)`` checks sample i's concepts against the graph; if consistent it adds them
    (the sample is then taken) and returns True. Rejected samples and their conflicting pairs
    are kept (up to ``keep_examples``) for the selection report.
    """

    def __init__(
        self,
        concepts: Sequence[Sequence[str]],
        threshold: float = DEFAULT_THRESHOLD,
        graph: ConceptConsistencyGraph | None = None,
        keep_examples: int = 200,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"NTM threshold must be in [0, 1], got {threshold}")
        self.concepts = concepts
        self.threshold = threshold
        self.graph = graph if graph is not None else ConceptConsistencyGraph()
        self.keep_examples = keep_examples
        self.n_checked = 0
        self.n_rejected = 0
        self.examples: dict[int, list[tuple[str, str]]] = {}

    def __call__(self, i: int) -> bool:
        self.n_checked += 1
        c = self.concepts[i]
        n_pairs, bad = self.graph._known_pairs(c)
        share = len(bad) / n_pairs if n_pairs else 0.0
        if share <= self.threshold:
            self.graph.add(c)
            return True
        self.n_rejected += 1
        if len(self.examples) < self.keep_examples:
            self.examples[i] = bad
        return False
