"""wordcount (python3): text processing — statistics of a text.

Request:
    {"text": "...",          # any Unicode text
     "top": 10,              # most frequent words to list, 0..100
     "stopwords": true}      # leave common English words out of "top"
Response:
    {"characters": n, "lines": n, "words": n, "unique_words": n,
     "sentences": n, "average_word_length": x, "reading_time_s": s,
     "top": [["word", count], ...]}

Words are runs of letters (apostrophes inside a word kept: "don't"),
compared case-insensitively (casefold); a sentence ends in . ! or ? and
white space, or at the end of the text. The stop-word list ships in the appfs (stopwords.txt) and is
read at load time, so a restored VM has it in memory already.
"""

import os
import re
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
# A sentence ends in . ! or ? (closing quotes or brackets may follow) and
# white space; the pieces between that hold a word are the sentences.
SENTENCE_BREAK = re.compile(r"[.!?]+['\"\u201d\u2019)\]]*\s+")
DEFAULT_TOP = 10
MAX_TOP = 100
WORDS_PER_MINUTE = 230


def _load_stopwords():
    words = set()
    with open(os.path.join(HERE, "stopwords.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                words.add(line.casefold())
    return frozenset(words)


STOPWORDS = _load_stopwords()


def _top(value):
    if value is None:
        return DEFAULT_TOP
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP:
        raise ValueError(f"top must be an integer 0..{MAX_TOP}")
    return value


def handle(request):
    if not isinstance(request, dict) or not isinstance(request.get("text"), str):
        raise ValueError('the request must be an object with a "text" string')
    text = request["text"]
    top = _top(request.get("top"))
    skip = request.get("stopwords", True)
    if not isinstance(skip, bool):
        raise ValueError("stopwords must be true or false")

    words = [w.replace("\u2019", "'").casefold() for w in WORD.findall(text)]
    counts = Counter(words)
    ranked = Counter({w: c for w, c in counts.items() if not (skip and w in STOPWORDS)})
    # Most frequent first, ties alphabetically: deterministic.
    best = sorted(ranked.items(), key=lambda wc: (-wc[1], wc[0]))[:top]
    sentences = sum(1 for s in SENTENCE_BREAK.split(text) if WORD.search(s))
    return {
        "characters": len(text),
        "lines": len(text.splitlines()),
        "words": len(words),
        "unique_words": len(counts),
        "sentences": sentences,
        "average_word_length": round(sum(map(len, words)) / len(words), 3) if words else 0.0,
        "reading_time_s": round(len(words) * 60 / WORDS_PER_MINUTE, 1),
        "top": [[w, c] for w, c in best],
    }
