"""Word lists for ``derive train``: read or make the words, build the vocabulary and the examples.

The lecture's data preparation (LECTURE.md, "Data"), for any newline-separated word list:
the vocabulary is ``.`` (token 0, the start/end marker) followed by the data's characters sorted;
every word gives ``len(word) + 1`` examples, a context of ``block_size`` previous tokens (padded
with 0) predicting the next token; the words are shuffled with ``random.seed(42)`` and split
80% / 10% / 10%. With the makemore ``names.txt`` this gives the lecture's 27 tokens and
182,625 / 22,655 / 22,866 examples.

Without a file, :func:`builtin_words` makes a name-like word list with a deterministic syllable
generator, so ``derive train`` works on a fresh install with nothing to download.

Example:
    >>> words = ["emma", "olivia", "ava"]
    >>> vocab = Vocabulary.from_words(words)
    >>> vocab.chars, vocab.size
    ('.aeilmov', 8)
    >>> ex = build_examples(["ava"], vocab, block_size=3)
    >>> ex.X.tolist(), ex.Y.tolist()
    ([[0, 0, 0], [0, 0, 1], [0, 1, 7], [1, 7, 1]], [1, 7, 1, 0])
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DeriveError

END = "."
"""The start/end marker: token 0, reserved (a word may not contain it)."""

SPLIT_SEED = 42
"""``random.seed(42)`` shuffles the words before the 80/10/10 split, as in the lecture."""

BUILTIN_COUNT = 5000
"""How many words :func:`builtin_words` makes by default."""


class DataError(DeriveError):
    """The word list cannot be used: missing, unreadable, empty, or a word outside the vocabulary."""


@dataclass(frozen=True)
class Vocabulary:
    """Tokens of the model: ``chars[0]`` is the start/end marker ``.``, the rest one character each."""

    chars: str

    @classmethod
    def from_words(cls, words: list[str]) -> Vocabulary:
        """``.`` followed by the sorted characters of ``words`` (27 tokens for names.txt).

        >>> Vocabulary.from_words(["bob", "al"]).chars
        '.ablo'
        """
        return cls(END + "".join(sorted(set("".join(words)))))

    @classmethod
    def from_chars(cls, chars: str) -> Vocabulary:
        """A fixed vocabulary: ``.`` followed by the sorted distinct ``chars`` (``.`` is reserved).

        >>> Vocabulary.from_chars("cba").chars
        '.abc'
        """
        if not chars:
            raise DataError(
                "--vocab is empty: give the characters words may use, e.g. --vocab abcdefghijklmnopqrstuvwxyz"
            )
        if END in chars:
            raise DataError(f"--vocab contains {END!r}, which is reserved for the start/end of a word")
        return cls(END + "".join(sorted(set(chars))))

    @property
    def size(self) -> int:
        """Number of tokens, the marker included."""
        return len(self.chars)

    @property
    def stoi(self) -> dict[str, int]:
        """Character to token id."""
        return {ch: i for i, ch in enumerate(self.chars)}

    def decode(self, tokens: list[int]) -> str:
        """Token ids to text (the end marker shows as ``.``).

        >>> Vocabulary(".ab").decode([1, 2, 0])
        'ab.'
        """
        return "".join(self.chars[t] for t in tokens)


@dataclass(frozen=True)
class Examples:
    """Contexts ``X`` (int64, examples x block_size) and next tokens ``Y`` (int64, examples)."""

    X: torch.Tensor
    Y: torch.Tensor

    def __len__(self) -> int:
        return int(self.Y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A word list ready for training: its vocabulary and the three splits of examples."""

    source: str
    words: int
    vocab: Vocabulary
    train: Examples
    val: Examples
    test: Examples


def builtin_words(count: int = BUILTIN_COUNT, seed: int = 0) -> list[str]:
    """``count`` distinct name-like lower-case words from a deterministic syllable generator.

    Only ``random.Random(seed).random()`` is used, whose sequence Python guarantees across versions,
    so the list is the same everywhere.

    >>> builtin_words(5)
    ['lylkeaxah', 'stemware', 'wielzinpo', 'bron', 'laimthoxel']
    >>> len(set(builtin_words())) == BUILTIN_COUNT
    True
    """
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < count:
        words.setdefault(_made_up_word(rng), None)
    return list(words)


_ONSETS = "b c d f g h j k l m n p r s t v w z br ch dr gr kr qu sh st th tr - -".split()
_VOWELS = "a a a e e e i i o o u y ai ea ie".split()
_CODAS = "- - - - - - - n n l r s m nd x".split()
_SYLLABLES = [1, 2, 2, 2, 3]
_ENDINGS = "- - - - a a a e ie o on el ette yn us ah er ia ine".split()


def _pick(rng: random.Random, choices: list[str]) -> str:
    """One of ``choices`` (``-`` stands for nothing), drawn with ``rng.random()`` only."""
    choice = choices[int(rng.random() * len(choices))]
    return "" if choice == "-" else choice


def _made_up_word(rng: random.Random) -> str:
    """One to three syllables (onset, vowel, coda) and an ending, between 3 and 10 letters."""
    while True:
        syllables = _SYLLABLES[int(rng.random() * len(_SYLLABLES))]
        word = "".join(_pick(rng, _ONSETS) + _pick(rng, _VOWELS) + _pick(rng, _CODAS) for _ in range(syllables))
        word += _pick(rng, _ENDINGS)
        if 3 <= len(word) <= 10:
            return word


def read_words(path: Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; a one-line :class:`DataError` otherwise."""
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_dir():
        raise DataError(f"data file {str(path)!r} is a directory, not a word list")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from None
    words = [line.strip() for line in text.splitlines()]
    words = [word for word in words if word]
    if not words:
        raise DataError(f"data file {str(path)!r} is empty: it needs one word per line")
    return words


def check_words(words: list[str], vocab: Vocabulary | None = None, source: str = "the data") -> None:
    """Raise a :class:`DataError` naming the first word that uses ``.`` or a character outside ``vocab``.

    >>> check_words(["ab", "a.b"])
    Traceback (most recent call last):
    ...
    derive.training.data.DataError: word 2 of the data, 'a.b', contains '.', which is reserved for the start/end of a word
    """
    allowed = vocab.chars[1:] if vocab is not None else None
    for number, word in enumerate(words, start=1):
        if END in word:
            raise DataError(
                f"word {number} of {source}, {word!r}, contains {END!r}, which is reserved for the start/end of a word"
            )
        if allowed is not None:
            outside = sorted(set(word) - set(allowed))
            if outside:
                raise DataError(
                    f"word {number} of {source}, {word!r}, has {''.join(outside)!r} outside the vocabulary {allowed!r}"
                )


def build_examples(words: list[str], vocab: Vocabulary, block_size: int) -> Examples:
    """Every word gives ``len(word) + 1`` (context, next token) pairs; contexts start padded with 0."""
    stoi = vocab.stoi
    contexts: list[list[int]] = []
    targets: list[int] = []
    for word in words:
        context = [0] * block_size
        for ch in word + END:
            token = stoi[ch]
            contexts.append(context)
            targets.append(token)
            context = context[1:] + [token]
    X = torch.tensor(contexts, dtype=torch.int64).reshape(len(targets), block_size)
    return Examples(X=X, Y=torch.tensor(targets, dtype=torch.int64))


def split_words(words: list[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str], list[str]]:
    """Shuffle as ``random.seed(seed); random.shuffle(words)`` does (without touching the global RNG),
    then cut 80% / 10% / 10%.

    >>> [len(part) for part in split_words([str(i) for i in range(10)])]
    [8, 1, 1]
    """
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


def load_dataset(path: Path | None = None, block_size: int = 3, vocab_chars: str | None = None) -> Dataset:
    """Words from ``path`` (or :func:`builtin_words`), checked, split and turned into examples.

    ``vocab_chars`` fixes the vocabulary (``.`` plus these characters); by default it is built from
    the data. Raises :class:`DataError` with a one-line message for every problem a user can cause.

    >>> ds = load_dataset()
    >>> ds.vocab.size, ds.words, len(ds.train) > 8 * len(ds.val) > 0
    (27, 5000, True)
    """
    words = read_words(path) if path is not None else builtin_words()
    source = repr(str(path)) if path is not None else f"the built-in list ({len(words):,} made-up names)"
    fixed = Vocabulary.from_chars(vocab_chars) if vocab_chars is not None else None
    check_words(words, fixed, source=source if path is not None else "the built-in list")
    vocab = fixed or Vocabulary.from_words(words)
    train, val, test = split_words(words)
    if not train or not val:
        raise DataError(
            f"{source} has only {len(words)} word(s): the 80/10/10 split leaves no "
            f"{'training' if not train else 'validation'} words (give at least 10)"
        )
    return Dataset(
        source=source,
        words=len(words),
        vocab=vocab,
        train=build_examples(train, vocab, block_size),
        val=build_examples(val, vocab, block_size),
        test=build_examples(test, vocab, block_size),
    )
