"""The teacher-output cache of stage 2: the teacher's outputs on replayable views, computed once.

``teacher_cache`` builds, loads and describes a cache file; ``lookup`` holds a loaded cache; ``spec`` holds what
determines its content and the key that names it; ``content`` digests the images; ``views`` runs the teacher on
every cached view; ``storage`` reads and writes the checked, atomic safetensors files; ``admin`` lists and ages
caches on disk (``dmlkd cache ls|clean``). Each module imports the others' public names only.
"""
