"""What every bench run shares; the scenarios (:mod:`bench.scenarios`) only describe the load.

- :mod:`~bench.harness.children`: child processes (each in its own session,
  ``PR_SET_PDEATHSIG``, all stopped at the end), the progress log;
- :mod:`~bench.harness.launch`: the same for the scripts that count one process
  from outside (blocking ``subprocess``: fleets, the counted process, its ready
  line), and :mod:`~bench.harness.callgrind`: valgrind's command line and
  ``callgrind_annotate``'s rows;
- :mod:`~bench.harness.procfs`: CPU ticks, RSS (and by mapping), open
  descriptors, system calls per process, the host's busy time, from /proc;
- :mod:`~bench.harness.tlsfiles`, :mod:`~bench.harness.fleets` (a simulated
  fleet process), :mod:`~bench.harness.targets` (direct, fleet-ingress,
  HAProxy, bare splice: started, ready when a real call goes through);
- :mod:`~bench.harness.carrier` (the lean carrier call, and the counting
  scripts' echoed calls) and
  :mod:`~bench.harness.generator` (the generator process in its four modes, and
  its reader in the orchestrator);
- :mod:`~bench.harness.stats`: percentiles, 5 % histograms, ratios, slopes (pure);
- :mod:`~bench.harness.run`: one run's fleets, targets, generators, samples and
  loads;
- :mod:`~bench.harness.report`: summary over rounds, JSON, Markdown, PNG;
  :mod:`~bench.harness.memory` and :mod:`~bench.harness.profile`: memhook
  snapshots, py-spy and perf; :mod:`~bench.harness.versions`: the code measured.
"""
