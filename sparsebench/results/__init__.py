"""Result folders: the record schema and the files of a run."""
