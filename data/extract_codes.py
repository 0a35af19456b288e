"""``python -m vistok.data.extract_codes``: the documented name of the code-extraction command,
which runs a tokenizer and so lives above data, in ``vistok.tokenizers.extract_codes``."""

from vistok.tokenizers.extract_codes import main

if __name__ == "__main__":
    main()
