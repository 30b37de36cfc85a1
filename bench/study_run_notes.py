"""What the records cannot say about a run, set by hand from the sessions' logs: runs that shared the machine, and
the machine of runs made before runs noted their own."""

# Runs whose timings are not those of the two cores alone (accuracy, which depends only on the updates, is not
# affected). Set by hand when a run had to share the machine; the report prints the reason next to the run.
SHARED_CPU = {
    "tan_cnn_c1_eps8": "shared the two cores with test runs for part of its time (views/s and wall time understate "
                       "its speed alone)",
    "tan_cnn_c1_eps8_b128": "shared the two cores with test runs for most of its time (views/s and wall time "
                            "understate its speed alone)",
    "tan_eq_d4d2_eps8": "shared the two cores with about 4 minutes of micro-benchmarks near its start and with "
                        "low-priority (nice 19) test runs later (views/s and wall time understate its speed alone)",
    "tan_eq_d4d2_eps2": "shared the two cores with about 12 minutes of memory measurements and tests in its first "
                        "40 minutes (views/s and wall time understate its speed alone)",
    "tan_cnn_c1_eps2": "shared the two cores with about 20 seconds of tests and a benchmark report rebuild in its "
                       "first 2 minutes (views/s and wall time understate its speed alone, slightly)",
    "tan_cnn_c1_sigma0": "shared the two cores with about 5 seconds of tests in its first 3 minutes (views/s and "
                         "wall time understate its speed alone, slightly)",
    "tan_eq_d4d2_eps1": "shared the two cores with about 20 CPU-seconds of a report check and low-priority (nice 19) "
                        "study tests in its first 12 minutes (views/s and wall time understate its speed alone, "
                        "slightly)",
    "tan_eq_d4d2_sigma0": "shared the two cores with a full fresh-clone CI run (27 minutes, from its 9th to its 36th "
                          "minute; about 37 views/s then against 59 alone) and about a minute of low-priority "
                          "(nice 19) study tests and report rebuilds before that (views/s and wall time understate "
                          "its speed alone)",
    "tan_wrn16_4_eps8_b64": "shared the two cores with about a minute of low-priority (nice 19) study tests and a "
                            "duplicate-code check, spread over its first 40 minutes (views/s and wall time understate "
                            "its speed alone, slightly)",
    "tan_eq_c4_eps8": "shared the two cores with about two minutes of low-priority (nice 19) study tests and report "
                      "rebuilds in its first 10 minutes (views/s and wall time understate its speed alone, slightly)",
    "tan_eq_d4d2_k4_eps8_b64": "shared the two cores with about three minutes of low-priority (nice 19) tests "
                               "(views/s and wall time understate its speed alone, slightly)",
    "tan_eq_d4d2_eps8_b64": "shared the two cores with about a minute of low-priority (nice 19) tests in its 27th "
                            "minute (views/s and wall time understate its speed alone, slightly)",
    "tan_wrn16_4_ws_tan_b128": "shared the two cores with low-priority tests for most of its first session, and "
                               "the DP engine changed under it twice (resumed at step 541 with the written-out "
                               "standardisation Jacobian, at step 1404 with the standardised ghost norms), so views/s "
                               "and wall time understate its speed alone and mix three engines (the updates are the "
                               "same to float rounding). At step 1404 a second process was started on its folder by "
                               "mistake for ~20 s, took no step and left a torn line in the privacy journal, removed "
                               "by hand; train.py now refuses a second process on a run folder",
    "tan_eq_d4d2_eps8_s1": "was stopped for 7 s in its 5th minute for a micro-benchmark and shared the two cores with "
                           "about a minute of low-priority (nice 19) study tests (views/s and wall time understate its "
                           "speed alone, slightly). Its first process, started the session before, was ended at step "
                           "78 before its first checkpoint; the run restarted from step 0 and those steps, never "
                           "released, are not counted",
    "tan_eq_d4d2_eps8_s2": "shared the two cores with about a minute of low-priority (nice 19) report rebuilds, "
                           "study tests and git in its first 4 minutes, and again in the first 3 minutes after it "
                           "resumed (views/s and wall time understate its speed alone, slightly). Its first process "
                           "was ended at step 746 by the end of a session; it resumed from its checkpoint at step 648 "
                           "on the same machine, and steps 649-746, never released, were taken again and are not "
                           "counted",
    "tan_eq_d4d2_eps1_s1": "shared the two cores with about a minute of low-priority (nice 19) report rebuilds, "
                           "study tests and git in its first 4 minutes (views/s and wall time understate its speed "
                           "alone, slightly). Its first process was ended at step 1499 by the end of a session; it "
                           "resumed from its checkpoint at step 1404 on the same machine, and steps 1405-1499, never "
                           "released, were taken again and are not counted",
    "tan_eq_d4d2_eps1_s2": "shared the two cores with about a minute of low-priority (nice 19) report rebuild, study "
                           "tests and a duplicate-code check in its first 14 minutes (views/s and wall time understate "
                           "its speed alone, slightly)",
    "tan_off_eq_d4d2_eps8": "shared the two cores with about a minute of a micro-benchmark in its 16th minute and "
                            "about 5 CPU-minutes of low-priority (nice 19) study tests and report rebuilds over its "
                            "first hour (views/s and wall time understate its speed alone, slightly). Its first "
                            "process, started the session before on another machine, was ended at step ~1000 by the "
                            "end of that session; its folder did not survive the change of machine, so the run "
                            "restarted from step 0 with the same seeds. That session's closing note quoted the first "
                            "process's EMA test accuracies at steps 216/432/648/864 (55.3 / 68.4 / 73.0 / 75.6%); "
                            "this run's were 54.7 / 67.6 / 73.1 / 75.7% (float rounding on another CPU takes the same "
                            "seeds elsewhere). The record and its ε are this run's alone",
    "tan_off_cnn_c1_eps8": "shared the two cores with about two minutes of a report rebuild and study tests in its "
                           "5th and 6th minutes (views/s and wall time understate its speed alone, slightly)",
    "tan_off_eq_d4d2_eps8_s1": "shared the two cores with a fresh-clone install of the test extras and about 4 "
                               "CPU-minutes of low-priority (nice 19) tests and report rebuilds in its first 15 "
                               "minutes (views/s and wall time understate its speed alone, slightly). Apart from "
                               "that, the same machine ran its first hour about a quarter slower than seed 0 the "
                               "session before (60 against 80 views/s at step 200, nothing else of ours running: the "
                               "host's load, which we do not see) and the rest at seed 0's speed: 8,243 s in all "
                               "against 7,587. Its first process, started the session before, was ended before its "
                               "first step",
    "tan_off_cnn_c1_eps8_s1": "shared the two cores with a few CPU-minutes of low-priority (nice 19) tests, report "
                              "rebuilds and a duplicate-code check in its first 12 minutes (views/s and wall time "
                              "understate its speed alone, slightly). Its first process was ended at step 569 by the "
                              "end of a session; it resumed from its checkpoint at step 540 on the same machine in "
                              "the next session, and steps 541-569, never released, were taken again and are not "
                              "counted",
    "tan_off_eq_d4d2_eps8_s2": "shared the two cores with about 2 CPU-minutes of low-priority (nice 19) report "
                               "rebuilds and study tests in its first 3 minutes (views/s and wall time understate its "
                               "speed alone, slightly)",
}
# Records made before runs noted their machine (machine.jsonl); set by hand from the session's log, for the runs
# whose machine is known. Runs in neither place show "not recorded".
MACHINE_FROM_SESSION_LOG = {name: "AMD EPYC, 2 cores" for name in ("tan_cnn_c1_eps2", "tan_cnn_c1_sigma0",
                                                                   "tan_cnn_c1_eps1")}
