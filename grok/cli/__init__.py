"""Command-line programs of the library, installed as console scripts by ``pip install``.

``grok-sample`` (``sample.py``), ``grok-plan`` (``plan.py``), ``grok-convert``
(``convert.py``), ``grok-train`` (``train.py``), ``grok-train-tokenizer``
(``train_tokenizer.py``); ``scripts/*.py`` in the checkout are the same programs. What they share
(one-line errors, exit statuses, argument types) is in ``common.py``.
"""
