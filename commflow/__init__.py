"""commflow: the communication layer of large-scale LLM training.

Parts (one subpackage each): ``sp`` sequence-parallel attention, ``overlap``
tensor-parallel GEMMs with hidden communication, ``monitor`` collective health,
``net`` traffic planning and flow-level simulation, ``decentral`` gossip learning
under link loss, ``train`` the reference trainer. ``dist`` builds process groups.
"""

__version__ = "0.1.0"
