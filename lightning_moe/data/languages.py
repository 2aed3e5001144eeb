"""Language codes the data pipeline accepts.

Corpora name languages by ISO 639-1 two-letter codes (``en``, ``de``, ``zh``).
The set is frozen so that a typo such as ``"ge"`` for German fails loudly at
load time instead of silently creating a new language tag.
"""

from __future__ import annotations

__all__ = ["ISO_639_1", "check_language"]

#: Every ISO 639-1 code (183 codes, as maintained by the Library of Congress).
ISO_639_1: frozenset[str] = frozenset(
    """
    aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy
    da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht
    hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky
    la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny
    oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss
    st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo
    za zh zu
    """.split()
)


def check_language(code: str, where: str) -> str:
    """Return ``code`` if it is an ISO 639-1 code, else raise.

    Args:
        code: The language code to check, e.g. ``"de"``.
        where: Where the code was found (a file and line, or an argument name);
            it is quoted in the error message.

    Returns:
        The code, unchanged.

    Raises:
        ValueError: If ``code`` is not an ISO 639-1 code.
    """
    if code not in ISO_639_1:
        known = " ".join(sorted(ISO_639_1))
        raise ValueError(
            f"{where}: unknown language code {code!r}; use a lowercase ISO 639-1 two-letter code "
            f"(e.g. 'de', 'zh', 'pt'; region variants such as 'pt_BR' or 'zh-Hans' are not accepted). "
            f"Known codes: {known}"
        )
    return code
