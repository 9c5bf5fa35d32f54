"""Routing core: pure, no I/O. Topic trie, JMESPath expressions, the immutable route table."""
