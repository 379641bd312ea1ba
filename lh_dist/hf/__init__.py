"""Hugging Face models in and out: the name and config mapping (`mapping`), `lh-import` (`importer`)
and `lh-export` (`export`)."""
