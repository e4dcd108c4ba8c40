"""fedtune.data: records -> conversations -> token ids.

``formats`` (record <-> Conversation), ``load`` (files, hub, built-ins), ``builtin`` (offline
corpora), ``templates`` (conversation -> labelled text pieces), ``tokenize`` (ids and labels).
"""
