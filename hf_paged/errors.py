"""Errors a user can cause, each with a message that says what to do."""


class OutOfPagesError(RuntimeError):
    """The page pool cannot hold a request. Raised before any page changes hands."""

    def __init__(self, num_needed: int, num_free: int, num_pages: int | None = None):
        self.num_needed = num_needed
        self.num_free = num_free
        self.num_pages = num_pages
        total = f" of {num_pages}" if num_pages is not None else ""
        super().__init__(
            f"needed {num_needed} pages, {num_free}{total} free; pass a larger "
            "PagedConfig(num_pages=...) or max_memory=..., or lower num_beams, "
            "num_return_sequences, the batch size or max_new_tokens"
        )


class UnsupportedModelError(TypeError):
    """`wrap()` was given a model whose attention hf_paged cannot serve."""

    def __init__(self, model_class: str, reason: str):
        self.model_class = model_class
        self.reason = reason
        super().__init__(f"hf_paged cannot wrap {model_class}: {reason}")
