# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""The template skeleton (`templates.skeleton`) as a hand-written scanner.

It reproduces, pass by pass, the sequential Python `re` masks the skeleton was first written
with (kept as the reference in `tests/test_skeleton_compiled.py`, which checks equality on
crafted edge cases, on every prompt of the lab's built-in generators and on the public
corpora): each pass reads the previous pass's output, as `re.sub` did, and follows `re`'s
semantics for str patterns: leftmost match, greedy / lazy quantifiers with the backtracking
they imply, look-arounds read on the pass's input, and Unicode classes (`\\w` =
`str.isalnum()` or "_", `\\d` = `str.isdecimal()`, `\\S` / `str.split()` whitespace =
`str.isspace()`; these are the CPython macros `re` itself uses).

The passes, in order (the regex each one computes):
    ```.*?(```|\\Z)  (dotall)        -> " <code> "
    <(\\w{1,30})>.*?</\\1>  (dotall)  -> " <\\1><data></\\1> "
    `[^`\\n]{1,300}`                  -> " <code> "
    https?://\\S+                     -> " <url> "
    www\\.\\S+                         -> " <url> "
    [\\w.+-]+@[\\w-]+\\.[\\w.-]+         -> " <email> "
    "[^"\\n]{1,500}"  “[^”\\n]{1,500}”  «[^»\\n]{1,500}»   -> " <q> "
    '(?<!\\w')[^'\\n]{1,300}'(?!\\w)    -> " <q> "
    \\b[A-Za-z_]\\w*(?:\\.[A-Za-z_]\\w*)+(?:\\(\\))?  -> "<id>", only when [A-Za-z_]\\.[A-Za-z_]
                                       occurs in the text at that point
    \\b\\w+_\\w+\\b  \\b\\w+\\(\\)  \\b[a-z]+[A-Z]\\w*   -> "<id>"
    \\b[A-Z][A-Za-z]+\\b               -> "<name>" unless a common word (`init`)
    \\d[\\d,._:/]*(?:%|st\\b|nd\\b|rd\\b|th\\b)?   -> "<num>"
then whitespace collapsed (`" ".join(text.split())`) and `str.lower()`.
"""

from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy


ctypedef unsigned int u32  # a code point (Cython's Py_UCS4 would coerce to str in arithmetic)


cdef extern from "Python.h":
    bint Py_UNICODE_ISALNUM(Py_UCS4 ch)
    bint Py_UNICODE_ISDECIMAL(Py_UCS4 ch)
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch)
    int PyUnicode_READY(object text) except -1
    Py_ssize_t PyUnicode_GET_LENGTH(object text)
    int PyUnicode_KIND(object text)
    void* PyUnicode_DATA(object text)
    Py_UCS4 PyUnicode_READ(int kind, void* data, Py_ssize_t index)
    object PyUnicode_FromKindAndData(int kind, const void* buffer, Py_ssize_t size)
    enum:
        PyUnicode_1BYTE_KIND
        PyUnicode_4BYTE_KIND


# ASCII character classes: bit 1 = \w, bit 2 = [A-Za-z_], bit 4 = [a-z], bit 8 = [A-Z]
cdef unsigned char ASCII_CLASS[128]
cdef int _k
for _k in range(128):
    ASCII_CLASS[_k] = 0
for _k in range(ord("0"), ord("9") + 1):
    ASCII_CLASS[_k] = 1
for _k in range(ord("a"), ord("z") + 1):
    ASCII_CLASS[_k] = 1 | 2 | 4
for _k in range(ord("A"), ord("Z") + 1):
    ASCII_CLASS[_k] = 1 | 2 | 8
ASCII_CLASS[ord("_")] = 1 | 2

# The common capitalised words the names pass keeps, as one sorted ASCII blob with an index
# by (length, first letter).
cdef enum:
    MAX_WORD = 32
cdef bytes _words_blob = b""
cdef const unsigned char* _words = NULL
cdef Py_ssize_t _bucket_start[MAX_WORD + 1][26]
cdef Py_ssize_t _bucket_end[MAX_WORD + 1][26]
cdef Py_ssize_t _head_chars = -1
cdef Py_ssize_t _tail_chars = -1


def init(common_words, Py_ssize_t head_chars, Py_ssize_t tail_chars):
    """Set the capitalised words the names pass keeps (ASCII, first letter upper-case) and
    the head / tail lengths a long text is cut to (`text[:head] + "\\n" + text[-tail:]` when
    it is longer than head + tail). Must be called once before `skeleton`."""
    global _words_blob, _words, _head_chars, _tail_chars
    cdef Py_ssize_t length, first, at
    words = sorted({w for w in common_words if 2 <= len(w) <= MAX_WORD},
                   key=lambda w: (len(w), w))
    for w in words:
        if not (w.isascii() and w.isalpha() and w[0].isupper()):
            raise ValueError(f"not a capitalised ASCII word: {w!r}")
    for length in range(MAX_WORD + 1):
        for first in range(26):
            _bucket_start[length][first] = 0
            _bucket_end[length][first] = 0
    blob = bytearray()
    for w in words:
        length, first, at = len(w), ord(w[0]) - ord("A"), len(blob)
        if _bucket_end[length][first] == 0:
            _bucket_start[length][first] = at
        blob += w.encode("ascii")
        _bucket_end[length][first] = len(blob)
    _words_blob = bytes(blob)
    _words = <const unsigned char*> _words_blob
    _head_chars, _tail_chars = head_chars, tail_chars


cdef inline bint is_word(u32 c) noexcept:
    if c < 128:
        return ASCII_CLASS[c] & 1
    return Py_UNICODE_ISALNUM(c)


cdef inline bint is_alpha_(u32 c) noexcept:  # [A-Za-z_]
    return c < 128 and (ASCII_CLASS[c] & 2)


cdef inline bint is_lower(u32 c) noexcept:  # [a-z]
    return c < 128 and (ASCII_CLASS[c] & 4)


cdef inline bint is_upper(u32 c) noexcept:  # [A-Z]
    return c < 128 and (ASCII_CLASS[c] & 8)


cdef inline bint is_letter(u32 c) noexcept:  # [A-Za-z]
    return c < 128 and (ASCII_CLASS[c] & 12)


cdef inline bint is_digit(u32 c) noexcept:
    if c < 128:
        return 48 <= c <= 57
    return Py_UNICODE_ISDECIMAL(c)


cdef inline bint is_space(u32 c) noexcept:
    return Py_UNICODE_ISSPACE(c)


cdef inline Py_ssize_t put(u32* d, Py_ssize_t o, const char* s) noexcept:
    cdef Py_ssize_t k = 0
    while s[k]:
        d[o] = <unsigned char> s[k]
        o += 1
        k += 1
    return o


cdef inline Py_ssize_t copy(u32* d, Py_ssize_t o, const u32* c, Py_ssize_t lo,
                            Py_ssize_t hi) noexcept:
    if hi > lo:
        memcpy(d + o, c + lo, (hi - lo) * sizeof(u32))
        return o + hi - lo
    return o


cdef inline Py_ssize_t word_end(const u32* c, Py_ssize_t n, Py_ssize_t i) noexcept:
    while i < n and is_word(c[i]):
        i += 1
    return i


# -- the passes ------------------------------------------------------------------------------
# Each reads c[0:n] and writes its output to d (capacity >= 5 n + 16: no match grows by more
# than 5x), copying the unmatched spans between matches; it returns the output length, or -1
# when nothing matched (then nothing was written and the input stands).
cdef inline Py_ssize_t finish(u32* d, Py_ssize_t o, const u32* c, Py_ssize_t last,
                              Py_ssize_t n, bint changed) noexcept:
    return copy(d, o, c, last, n) if changed else -1


cdef Py_ssize_t pass_fences(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # ```.*?(```|\Z), dotall
    cdef Py_ssize_t i = 0, o = 0, j, last = 0
    cdef bint changed = False
    while i + 2 < n:
        if c[i] == 96 and c[i + 1] == 96 and c[i + 2] == 96:
            j = i + 3
            while j + 2 < n and not (c[j] == 96 and c[j + 1] == 96 and c[j + 2] == 96):
                j += 1
            o = put(d, copy(d, o, c, last, i), b" <code> ")
            i = last = j + 3 if j + 2 < n else n
            changed = True
        else:
            i += 1
    return finish(d, o, c, last, n, changed)


cdef Py_ssize_t pass_tags(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # <(\w{1,30})>.*?</\1>, dotall
    cdef Py_ssize_t i = 0, o = 0, j, k, m, length, last_close = -1, last = 0
    cdef bint changed = False
    for k in range(n - 1):
        if c[k] == 60 and c[k + 1] == 47:  # "</"
            last_close = k
    while i < last_close:
        if c[i] == 60:
            j = i + 1
            while j < n and j - i <= 31 and is_word(c[j]):
                j += 1
            length = j - i - 1
            if 1 <= length <= 30 and j < n and c[j] == 62:
                # the first "</name>" at or after j + 1
                k = j + 1
                while k <= last_close:
                    if c[k] == 60 and c[k + 1] == 47 and k + 2 + length < n \
                            and c[k + 2 + length] == 62:
                        m = 0
                        while m < length and c[k + 2 + m] == c[i + 1 + m]:
                            m += 1
                        if m == length:
                            break
                    k += 1
                if k <= last_close:
                    o = put(d, copy(d, o, c, last, i), b" <")
                    o = copy(d, o, c, i + 1, j)
                    o = put(d, o, b"><data></")
                    o = copy(d, o, c, i + 1, j)
                    o = put(d, o, b"> ")
                    i = last = k + 3 + length
                    changed = True
                    continue
        i += 1
    return finish(d, o, c, last, n, changed)


cdef Py_ssize_t pass_delimited(const u32* c, Py_ssize_t n, u32* d, u32 opening,
                               u32 closing, Py_ssize_t longest, const char* replacement,
                               bint apostrophe) noexcept:
    # opening [^closing\n]{1,longest} closing; with `apostrophe`, '(?<!\w')...'(?!\w)
    cdef Py_ssize_t i = 0, o = 0, j, length, last = 0
    cdef bint changed = False
    while i < n:
        if c[i] == opening and not (apostrophe and i > 0 and is_word(c[i - 1])):
            j = i + 1
            while j < n and c[j] != closing and c[j] != 10 and j - i <= longest + 1:
                j += 1
            length = j - i - 1
            if 1 <= length <= longest and j < n and c[j] == closing and not (
                    apostrophe and j + 1 < n and is_word(c[j + 1])):
                o = put(d, copy(d, o, c, last, i), replacement)
                i = last = j + 1
                changed = True
                continue
        i += 1
    return finish(d, o, c, last, n, changed)


cdef inline bint starts_with(const u32* c, Py_ssize_t n, Py_ssize_t i,
                             const char* s) noexcept:
    cdef Py_ssize_t k = 0
    while s[k]:
        if i + k >= n or c[i + k] != <unsigned char> s[k]:
            return False
        k += 1
    return True


cdef Py_ssize_t pass_urls(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # https?://\S+
    cdef Py_ssize_t i = 0, o = 0, j, last = 0
    cdef bint changed = False
    while i < n:
        if c[i] == 104 and starts_with(c, n, i, b"http"):
            j = i + 4
            if j < n and c[j] == 115:  # s
                j += 1
            if starts_with(c, n, j, b"://") and j + 3 < n and not is_space(c[j + 3]):
                j += 4
                while j < n and not is_space(c[j]):
                    j += 1
                o = put(d, copy(d, o, c, last, i), b" <url> ")
                i = last = j
                changed = True
                continue
        i += 1
    return finish(d, o, c, last, n, changed)


cdef Py_ssize_t pass_www(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # www\.\S+
    cdef Py_ssize_t i = 0, o = 0, j, last = 0
    cdef bint changed = False
    while i < n:
        if c[i] == 119 and starts_with(c, n, i, b"www.") and i + 4 < n \
                and not is_space(c[i + 4]):
            j = i + 5
            while j < n and not is_space(c[j]):
                j += 1
            o = put(d, copy(d, o, c, last, i), b" <url> ")
            i = last = j
            changed = True
            continue
        i += 1
    return finish(d, o, c, last, n, changed)


cdef inline bint email_local(u32 ch) noexcept:  # [\w.+-]
    return ch == 46 or ch == 43 or ch == 45 or is_word(ch)


cdef inline bint email_domain(u32 ch) noexcept:  # [\w-]
    return ch == 45 or is_word(ch)


cdef inline bint email_tail(u32 ch) noexcept:  # [\w.-]
    return ch == 46 or ch == 45 or is_word(ch)


cdef Py_ssize_t pass_emails(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # [\w.+-]+@[\w-]+\.[\w.-]+ : every start inside one [\w.+-] run ends that run at the same
    # place, so the run's first start decides for all of them.
    cdef Py_ssize_t i = 0, o = 0, k, p, q, last = 0
    cdef bint changed = False
    while i < n:
        if not email_local(c[i]):
            i += 1
            continue
        k = i + 1
        while k < n and email_local(c[k]):
            k += 1
        if k < n and c[k] == 64:  # @
            p = k + 1
            while p < n and email_domain(c[p]):
                p += 1
            if p > k + 1 and p < n and c[p] == 46:
                q = p + 1
                while q < n and email_tail(c[q]):
                    q += 1
                if q > p + 1:
                    o = put(d, copy(d, o, c, last, i), b" <email> ")
                    i = last = q
                    changed = True
                    continue
            k += 1  # the "@" cannot start a match either
        i = k
    return finish(d, o, c, last, n, changed)


cdef bint dotted_hint(const u32* c, Py_ssize_t n) noexcept:
    # [A-Za-z_]\.[A-Za-z_]
    cdef Py_ssize_t i
    for i in range(1, n - 1):
        if c[i] == 46 and is_alpha_(c[i - 1]) and is_alpha_(c[i + 1]):
            return True
    return False


cdef Py_ssize_t pass_dotted(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # \b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?
    # Words are visited start to end: no match starts inside a word (no \b there), and a
    # match ends at a word's end or after "()".
    cdef Py_ssize_t i = 0, o = 0, r, p, last = 0
    cdef bint changed = False, dotted
    while i < n:
        while i < n and not is_word(c[i]):
            i += 1
        if i == n:
            break
        r = word_end(c, n, i + 1)
        if is_alpha_(c[i]):
            p = r
            dotted = False
            while p + 1 < n and c[p] == 46 and is_alpha_(c[p + 1]):
                p = word_end(c, n, p + 2)
                dotted = True
            if dotted:
                if p + 1 < n and c[p] == 40 and c[p + 1] == 41:
                    p += 2
                o = put(d, copy(d, o, c, last, i), b"<id>")
                i = last = p
                changed = True
                continue
        i = r
    return finish(d, o, c, last, n, changed)


cdef Py_ssize_t pass_words(const u32* c, Py_ssize_t n, u32* d, bint upper) noexcept:
    # The four word masks, in their order, as one pass: each replaces whole words (maximal
    # \w runs, with non-\w neighbours) by a token whose only word is "id" (which none of the
    # later ones matches) and leaves the other words and their boundaries as they were, so
    # each word meets the masks in turn:
    #   \b\w+_\w+\b -> <id>;  \b\w+\(\) -> <id>;  \b[a-z]+[A-Z]\w* -> <id>;
    #   \b[A-Z][A-Za-z]+\b -> <name> unless a common word   (the last two need `upper`)
    cdef Py_ssize_t i = 0, o = 0, r, q, last = 0
    cdef bint changed = False, hit
    cdef const char* token
    while i < n:
        while i < n and not is_word(c[i]):
            i += 1
        if i == n:
            break
        r = word_end(c, n, i + 1)
        token = NULL
        for q in range(i + 1, r - 1):
            if c[q] == 95:
                token = b"<id>"
                break
        if token == NULL and r + 1 < n and c[r] == 40 and c[r + 1] == 41:
            o = put(d, copy(d, o, c, last, i), b"<id>")
            i = last = r + 2
            changed = True
            continue
        if token == NULL and upper:
            if is_lower(c[i]):
                q = i + 1
                while q < r and is_lower(c[q]):
                    q += 1
                if q < r and is_upper(c[q]):
                    token = b"<id>"
            elif is_upper(c[i]) and r - i >= 2:
                q = i + 1
                while q < r and is_letter(c[q]):
                    q += 1
                if q == r and not common_word(c, i, r - i):
                    token = b"<name>"
        if token != NULL:
            o = put(d, copy(d, o, c, last, i), token)
            last = r
            changed = True
        i = r
    return finish(d, o, c, last, n, changed)


cdef bint common_word(const u32* c, Py_ssize_t i, Py_ssize_t length) noexcept:
    cdef Py_ssize_t at, end, m
    if length > MAX_WORD:
        return False
    at = _bucket_start[length][c[i] - 65]
    end = _bucket_end[length][c[i] - 65]
    while at < end:
        m = 0
        while m < length and _words[at + m] == c[i + m]:
            m += 1
        if m == length:
            return True
        at += length
    return False


cdef inline bint number_char(u32 ch) noexcept:  # [\d,._:/]
    return ch == 44 or ch == 46 or ch == 95 or ch == 58 or ch == 47 or is_digit(ch)


cdef Py_ssize_t pass_numbers(const u32* c, Py_ssize_t n, u32* d) noexcept:
    # \d[\d,._:/]*(?:%|st\b|nd\b|rd\b|th\b)?
    cdef Py_ssize_t i = 0, o = 0, p, last = 0
    cdef bint changed = False
    cdef u32 a, b
    while i < n:
        if is_digit(c[i]):
            p = i + 1
            while p < n and number_char(c[p]):
                p += 1
            if p < n and c[p] == 37:
                p += 1
            elif p + 1 < n and (p + 2 == n or not is_word(c[p + 2])):
                a, b = c[p], c[p + 1]
                if (a == 115 and b == 116) or (a == 110 and b == 100) or (
                        a == 114 and b == 100) or (a == 116 and b == 104):
                    p += 2
            o = put(d, copy(d, o, c, last, i), b"<num>")
            i = last = p
            changed = True
            continue
        i += 1
    return finish(d, o, c, last, n, changed)


cdef struct Buffers:
    u32* src
    u32* dst
    Py_ssize_t n
    Py_ssize_t cap


cdef int reserve(Buffers* b) except -1:
    cdef Py_ssize_t need = 5 * b.n + 16
    cdef u32* p
    if need > b.cap:
        need = max(need, 2 * b.cap)
        p = <u32*> realloc(b.src, need * sizeof(u32))
        if p == NULL:
            raise MemoryError()
        b.src = p
        p = <u32*> realloc(b.dst, need * sizeof(u32))
        if p == NULL:
            raise MemoryError()
        b.dst = p
        b.cap = need
    return 0


cdef inline void swap(Buffers* b, Py_ssize_t n) noexcept:
    """Make a pass's output (of length n, -1 = unchanged) the next pass's input."""
    cdef u32* t
    if n < 0:
        return
    t = b.src
    b.src = b.dst
    b.dst = t
    b.n = n


# The scan buffers, kept between calls (allocating ~2 x 5 n code points per call costs more
# than the scan: page faults). The GIL is held for a whole call, which calls no Python code;
# `_busy` makes a re-entrant call (there is none) use buffers of its own.
cdef Buffers _kept
_kept.src = NULL
_kept.dst = NULL
_kept.cap = 0
_kept.n = 0
cdef bint _busy = False


def skeleton(str text):
    """The prompt with its variable data masked, lower-cased, whitespace collapsed."""
    if _head_chars < 0:
        raise RuntimeError("_skeleton.init() was not called")
    PyUnicode_READY(text)
    cdef Py_ssize_t length = PyUnicode_GET_LENGTH(text)
    cdef int kind = PyUnicode_KIND(text)
    cdef void* data = PyUnicode_DATA(text)
    cdef Buffers b
    cdef Py_ssize_t i, o, k, n
    cdef u32 ch
    cdef bint seen[128]
    cdef bint curly = False, guillemet = False, nonascii = False, ascii_out, upper, digits
    cdef unsigned char* narrow
    global _busy
    cdef bint private = _busy
    if private:
        b.src = NULL
        b.dst = NULL
        b.cap = 0
    else:
        _busy = True
        b.src = _kept.src
        b.dst = _kept.dst
        b.cap = _kept.cap
    b.n = length
    if length > _head_chars + _tail_chars:
        b.n = _head_chars + 1 + _tail_chars
    try:
        reserve(&b)
        if length > _head_chars + _tail_chars:
            for i in range(_head_chars):
                b.src[i] = PyUnicode_READ(kind, data, i)
            b.src[_head_chars] = 10
            for i in range(_tail_chars):
                b.src[_head_chars + 1 + i] = PyUnicode_READ(kind, data,
                                                            length - _tail_chars + i)
        else:
            for i in range(length):
                b.src[i] = PyUnicode_READ(kind, data, i)
        # Which characters occur: a pass whose pattern needs a character absent from the
        # text is skipped (no pass inserts any of them: the inserted tokens are ASCII lower-
        # case letters, spaces and "<>/", and tag names are copies of the text's own).
        for k in range(128):
            seen[k] = False
        for i in range(b.n):
            ch = b.src[i]
            if ch < 128:
                seen[ch] = True
            else:
                nonascii = True
                if ch == 0x201C:
                    curly = True
                elif ch == 0xAB:
                    guillemet = True
        if seen[96]:
            swap(&b, pass_fences(b.src, b.n, b.dst))
            reserve(&b)
        if seen[47] and (seen[60] or seen[96]):
            swap(&b, pass_tags(b.src, b.n, b.dst))
            reserve(&b)
        if seen[96]:
            swap(&b, pass_delimited(b.src, b.n, b.dst, 96, 96, 300, b" <code> ", False))
            reserve(&b)
        if seen[104]:
            swap(&b, pass_urls(b.src, b.n, b.dst))
            reserve(&b)
        if seen[119]:
            swap(&b, pass_www(b.src, b.n, b.dst))
            reserve(&b)
        if seen[64]:
            swap(&b, pass_emails(b.src, b.n, b.dst))
            reserve(&b)
        if seen[34]:
            swap(&b, pass_delimited(b.src, b.n, b.dst, 34, 34, 500, b" <q> ", False))
            reserve(&b)
        if curly:
            swap(&b, pass_delimited(b.src, b.n, b.dst, 0x201C, 0x201D, 500, b" <q> ", False))
            reserve(&b)
        if guillemet:
            swap(&b, pass_delimited(b.src, b.n, b.dst, 0xAB, 0xBB, 500, b" <q> ", False))
            reserve(&b)
        if seen[39]:
            swap(&b, pass_delimited(b.src, b.n, b.dst, 39, 39, 300, b" <q> ", True))
            reserve(&b)
        if seen[46] and dotted_hint(b.src, b.n):
            swap(&b, pass_dotted(b.src, b.n, b.dst))
            reserve(&b)
        upper = False
        for k in range(65, 91):
            if seen[k]:
                upper = True
                break
        if upper or seen[95] or seen[40]:
            swap(&b, pass_words(b.src, b.n, b.dst, upper))
            reserve(&b)
        digits = nonascii
        for k in range(48, 58):
            if seen[k]:
                digits = True
                break
        if digits:
            swap(&b, pass_numbers(b.src, b.n, b.dst))
        # " ".join(text.split()), then lower(): ASCII here, str.lower() otherwise
        o = 0
        n = b.n
        i = 0
        ascii_out = True
        while i < n:
            while i < n and is_space(b.src[i]):
                i += 1
            if i == n:
                break
            if o:
                b.dst[o] = 32
                o += 1
            while i < n and not is_space(b.src[i]):
                ch = b.src[i]
                if ch >= 128:
                    ascii_out = False
                b.dst[o] = ch
                o += 1
                i += 1
        if ascii_out:
            narrow = <unsigned char*> b.src  # the source is no longer needed
            for i in range(o):
                ch = b.dst[i]
                narrow[i] = <unsigned char> (ch + 32 if 65 <= ch <= 90 else ch)
            return PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, narrow, o)
        return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, b.dst, o).lower()
    finally:
        if private:
            free(b.src)
            free(b.dst)
        else:
            _kept.src = b.src
            _kept.dst = b.dst
            _kept.cap = b.cap
            _busy = False


# -- MinHash input: rensa's hash of every word shingle of a batch of skeletons -----------------
cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL

ctypedef unsigned long long u64

cdef extern from *:
    """
    static inline unsigned long long dg_multiply_mix(unsigned long long x, unsigned long long y)
    {   /* (x * y as 128 bits): low half XOR high half */
        unsigned __int128 full = (unsigned __int128) x * y;
        return (unsigned long long) full ^ (unsigned long long) (full >> 64);
    }
    """
    u64 multiply_mix "dg_multiply_mix"(u64 x, u64 y) noexcept

cdef u64 FX_SEED1 = 0x243F6A8885A308D3ULL
cdef u64 FX_SEED2 = 0x13198A2E03707344ULL
cdef u64 FX_ZERO_COLLAPSE = 0xA4093822299F31D0ULL
cdef u64 FX_K = 0xF1357AEA2E62A9C5ULL


cdef inline u64 load64(const unsigned char* p) noexcept:
    cdef u64 v
    memcpy(&v, p, 8)  # little-endian (x86, arm64)
    return v


cdef inline u64 load32(const unsigned char* p) noexcept:
    cdef unsigned int v
    memcpy(&v, p, 4)
    return v


cdef inline u64 fx_hash(const unsigned char* p, Py_ssize_t length) noexcept:
    """rensa's token hash (`utils::calculate_hash_fast`: rustc-hash 2's FxHasher::write +
    finish) of the bytes p[0:length]."""
    cdef u64 s0 = FX_SEED1, s1 = FX_SEED2, a, b, t, h
    cdef Py_ssize_t k, rounds
    if length <= 16:
        if length >= 8:
            s0 ^= load64(p)
            s1 ^= load64(p + length - 8)
        elif length >= 4:
            s0 ^= load32(p)
            s1 ^= load32(p + length - 4)
        elif length > 0:
            s0 ^= p[0]
            s1 ^= (<u64> p[length - 1] << 8) | p[length // 2]
    else:
        a, b = s0, s1
        rounds = (length - 1) // 16
        for k in range(rounds):
            t = multiply_mix(a ^ load64(p + 16 * k), FX_ZERO_COLLAPSE ^ load64(p + 16 * k + 8))
            a, b = b, t
        s0 = a ^ load64(p + length - 16)
        s1 = b ^ load64(p + length - 8)
    h = (multiply_mix(s0, s1) ^ <u64> length) * FX_K
    return (h << 26) | (h >> 38)


def token_hash(bytes token):
    """rensa's u64 hash of one token's UTF-8 bytes (for the tests)."""
    return fx_hash(<const unsigned char*> token, len(token))


def shingle_hashes(skeletons, Py_ssize_t words):
    """rensa's hash of every `words`-word shingle of each non-empty skeleton (single spaces
    between tokens, as `skeleton` returns them; a skeleton of no more than `words` tokens is
    one shingle, itself), on the UTF-8 bytes, in order: (hashes uint64, row offsets uint64 of
    len(present) + 1, present: the indices of the non-empty skeletons)."""
    import numpy as np
    cdef Py_ssize_t rows = len(skeletons), i, j, size, total = 0, tokens, at = 0, count, k
    cdef Py_ssize_t shingle_start, first_end
    cdef const unsigned char* p
    cdef list buffers = [None] * rows
    cdef Py_ssize_t[::1] sizes = np.zeros(rows, dtype=np.intp)
    cdef Py_ssize_t[::1] counts = np.zeros(rows, dtype=np.intp)
    cdef Py_ssize_t present_rows = 0
    cdef Py_ssize_t* ends
    for i in range(rows):
        p = <const unsigned char*> PyUnicode_AsUTF8AndSize(skeletons[i], &size)
        sizes[i] = size
        if size == 0:
            continue
        tokens = 1
        for j in range(size):
            if p[j] == 32:
                tokens += 1
        counts[i] = tokens - (words - 1) if tokens > words else 1
        total += counts[i]
        present_rows += 1
    hashes = np.empty(total, dtype=np.uint64)
    offsets = np.zeros(present_rows + 1, dtype=np.uint64)
    present = np.empty(present_rows, dtype=np.intp)
    cdef u64[::1] h = hashes
    cdef u64[::1] o = offsets
    cdef Py_ssize_t[::1] r = present
    cdef Py_ssize_t row = 0
    # token end offsets of one skeleton (reused)
    cdef Py_ssize_t capacity = 0
    ends = NULL
    try:
        for i in range(rows):
            size = sizes[i]
            if size == 0:
                continue
            p = <const unsigned char*> PyUnicode_AsUTF8AndSize(skeletons[i], &size)
            count = counts[i]
            if count == 1:
                h[at] = fx_hash(p, size)
                at += 1
            else:
                tokens = count + words - 1
                if tokens + 1 > capacity:
                    capacity = 2 * (tokens + 1)
                    free(ends)
                    ends = <Py_ssize_t*> malloc(capacity * sizeof(Py_ssize_t))
                    if ends == NULL:
                        raise MemoryError()
                k = 0
                for j in range(size):
                    if p[j] == 32:
                        ends[k] = j
                        k += 1
                ends[k] = size
                # shingle k: from the start of token k (after the space ending token k - 1)
                # to the end of token k + words - 1
                for k in range(count):
                    shingle_start = ends[k - 1] + 1 if k > 0 else 0
                    first_end = ends[k + words - 1]
                    h[at] = fx_hash(p + shingle_start, first_end - shingle_start)
                    at += 1
            r[row] = i
            row += 1
            o[row] = at
    finally:
        free(ends)
    return hashes, offsets, present


cdef extern from "Python.h":
    unsigned long long PyLong_AsUnsignedLongLongMask(object value) except? <unsigned long long> -1
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)


cdef const char* HEX_DIGITS = b"0123456789abcdef"


def band_keys(list rows, multipliers, Py_ssize_t bands):
    """LSH band keys (`"band:hash"`) of each MinHash digest in `rows` (lists of ints, `bands`
    times len(multipliers) of them): per band, the 48-bit polynomial hash (uint64 wrapping)
    sum(value[r] * multipliers[r]) >> 16, as 12 hex digits."""
    cdef Py_ssize_t per_band = len(multipliers), b, r, k
    cdef u64 mult[64]
    cdef u64 acc
    cdef char key[32]
    cdef list row, keys, out = []
    if per_band > 64 or bands > 10:
        raise ValueError("at most 10 bands of at most 64 rows")
    for r in range(per_band):
        mult[r] = PyLong_AsUnsignedLongLongMask(int(multipliers[r]))
    for row in rows:
        if len(row) != bands * per_band:
            raise ValueError(f"a digest of {len(row)} values, not {bands * per_band}")
        keys = []
        for b in range(bands):
            acc = 0
            for r in range(per_band):
                acc += PyLong_AsUnsignedLongLongMask(row[b * per_band + r]) * mult[r]
            acc >>= 16
            key[0] = 48 + b
            key[1] = 58  # ":"
            for k in range(12):
                key[13 - k] = HEX_DIGITS[acc & 15]
                acc >>= 4
            keys.append(PyUnicode_DecodeASCII(key, 14, NULL))
        out.append(keys)
    return out
