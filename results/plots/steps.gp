if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,560 } else { set terminal png size 900,560 }
set termoption noenhanced
set output 'results/steps.png'
datafile = 'results/plots/steps.dat'
set title 'Intermediate task vectors (test)'
set xlabel 'fine-tuning step'
set ylabel 'value'
set yrange [0:1.05]
set key bottom right
set grid
plot datafile using 1:2 with linespoints title 'cosine(tau_step, tau_final)', '' using 1:3 with linespoints title 'single-task accuracy', '' using 1:4 with linespoints title 'addition of all tasks (normalized to final fine-tuned)'
