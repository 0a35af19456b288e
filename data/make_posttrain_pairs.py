"""``python -m vistok.data.make_posttrain_pairs``: the documented name of the post-training
pairs command, which runs a generator and so lives above data, in
``vistok.generators.posttrain_pairs``."""

from vistok.generators.posttrain_pairs import main

if __name__ == "__main__":
    main()
