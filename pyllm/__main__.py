from pyllm.cli import entry

entry()
