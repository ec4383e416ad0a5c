"""`llmapi bench --workload code-rewrite`: a repetitive real-text workload for speculative decoding (rewrite a code
snippet with one variable renamed: most of the answer copies the prompt, which n-gram drafts can guess), and the
comparison of a speculative run with plain decoding of the same prompts."""

from __future__ import annotations

from .bench_guided import _encode

# (language, code, variable to rename, new name): small real functions, each renaming a name used several times.
SNIPPETS = [
    ("python", '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = sum(values[:window])
    result.append(total / window)
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        result.append(total / window)
    return result''', "total", "running_sum"),
    ("python", '''def word_counts(path):
    counts = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            for word in line.lower().split():
                word = word.strip(".,;:!?\\"'()")
                if word:
                    counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])''', "counts", "frequencies"),
    ("javascript", '''function debounce(callback, delay) {
  let timer = null;
  return function (...args) {
    if (timer !== null) {
      clearTimeout(timer);
    }
    timer = setTimeout(() => {
      timer = null;
      callback.apply(this, args);
    }, delay);
  };
}''', "timer", "pendingTimeout"),
    ("c", '''int binary_search(const int *items, int count, int key) {
    int low = 0;
    int high = count - 1;
    while (low <= high) {
        int mid = low + (high - low) / 2;
        if (items[mid] == key) {
            return mid;
        } else if (items[mid] < key) {
            low = mid + 1;
        } else {
            high = mid - 1;
        }
    }
    return -1;
}''', "mid", "middle"),
    ("python", '''class Inventory:
    def __init__(self):
        self.stock = {}

    def add(self, item, quantity=1):
        self.stock[item] = self.stock.get(item, 0) + quantity

    def remove(self, item, quantity=1):
        if self.stock.get(item, 0) < quantity:
            raise KeyError(f"not enough {item} in stock")
        self.stock[item] -= quantity
        if self.stock[item] == 0:
            del self.stock[item]''', "stock", "items_on_hand"),
    ("go", '''func reverseWords(sentence string) string {
	words := strings.Fields(sentence)
	for left, right := 0, len(words)-1; left < right; left, right = left+1, right-1 {
		words[left], words[right] = words[right], words[left]
	}
	return strings.Join(words, " ")
}''', "words", "tokens"),
]


def code_rewrite_texts(num: int) -> list[str]:
    """`num` requests, cycling over SNIPPETS: the instruction, then the snippet in a fenced block."""
    texts = []
    for i in range(num):
        language, code, old, new = SNIPPETS[i % len(SNIPPETS)]
        texts.append(f"Rewrite this {language} code with the variable `{old}` renamed to `{new}`. Change nothing "
                     f"else and reply with the complete code only.\n\n```{language}\n{code}\n```")
    return texts


def code_rewrite_prompts(tokenizer, num: int, max_len: int, offset: int = 0) -> list[list[int]]:
    """The requests' ids (the chat template applied if the tokenizer has one), starting at snippet `offset`;
    ValueError when one is longer than `max_len` tokens (--isl, the prompt budget of this workload)."""
    texts = code_rewrite_texts(num + offset)[offset:]
    prompts = [_encode(tokenizer, t) for t in texts]
    longest = max(len(p) for p in prompts)
    if longest > max_len:
        raise ValueError(f"--isl={max_len} is too short for --workload code-rewrite: a prompt takes {longest} tokens "
                         "(--isl is this workload's most prompt tokens; try --isl 512)")
    return prompts


def compare_tokens(ours: list[list[int]], plain: list[list[int]]) -> dict:
    """How many requests' outputs equal plain decoding's token for token, and over how many output positions the
    two agree before the first difference (summed)."""
    same = sum(a == b for a, b in zip(ours, plain))
    prefix = 0
    for a, b in zip(ours, plain):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += n
    return {"requests_compared": len(plain), "requests_equal": same, "common_prefix_tokens": prefix}


__all__ = ["SNIPPETS", "code_rewrite_texts", "code_rewrite_prompts", "compare_tokens"]
