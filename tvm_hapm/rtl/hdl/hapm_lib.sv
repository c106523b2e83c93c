// Small building blocks of the hapm_fpga accelerator: a delay line, a synchronous FIFO and the
// on-chip buffers.  Memories are written as arrays with registered reads so that synthesis maps
// them to block RAM; every buffer is zero at reset of the simulation (docs/isa.md: "All buffers
// are zero when a program starts").

// q is d delayed by N clock cycles (N = 0: a wire).
module hapm_delay #(parameter int W = 1, parameter int N = 1) (
    input  logic         clk,
    input  logic [W-1:0] d,
    output logic [W-1:0] q
);
  generate
    if (N == 0) begin : g_wire
      assign q = d;
    end else begin : g_regs
      logic [W-1:0] s [0:N-1];
      always_ff @(posedge clk) begin
        s[0] <= d;
        for (int i = 1; i < N; i++) s[i] <= s[i-1];
      end
      assign q = s[N-1];
    end
  endgenerate
endmodule

// First-word-fall-through FIFO: head is valid while !empty; pop removes it.
module hapm_fifo #(parameter int W = 128, parameter int AW = 4) (
    input  logic         clk,
    input  logic         rst,
    input  logic         push,
    input  logic [W-1:0] din,
    input  logic         pop,
    output logic [W-1:0] head,
    output logic         empty,
    output logic         full
);
  logic [W-1:0] mem [0:(1<<AW)-1];
  logic [AW:0] rd, wr;
  assign empty = rd == wr;
  assign full = (wr - rd) == (AW+1)'(1 << AW);
  assign head = mem[rd[AW-1:0]];
  always_ff @(posedge clk) begin
    if (rst) begin
      rd <= '0;
      wr <= '0;
    end else begin
      if (push && !full) begin
        mem[wr[AW-1:0]] <= din;
        wr <= wr + 1'b1;
      end
      if (pop && !empty) rd <= rd + 1'b1;
    end
  end
endmodule

// A buffer with NW write ports (lower index wins on the same address; the programs the
// simulator accepts never write one entry from two ports in one cycle) and NR registered read
// ports: rdata is the entry as it was before this cycle's writes.
module hapm_ram #(parameter int W = 8, parameter int D = 16, parameter int AW = 4,
                  parameter int NR = 1, parameter int NW = 1) (
    input  logic            clk,
    input  logic [NW-1:0]   we,
    input  logic [NW*AW-1:0] waddr,
    input  logic [NW*W-1:0] wdata,
    input  logic [NR*AW-1:0] raddr,
    output logic [NR*W-1:0] rdata
);
  logic [W-1:0] mem [0:D-1];
`ifndef SYNTHESIS
  // Simulation starts from zero; on the FPGA, block RAM and UltraRAM are zero after
  // configuration, and synthesis skips the loop (Yosys unrolls it entry by entry).
  initial for (int i = 0; i < D; i++) mem[i] = '0;
`endif
  always_ff @(posedge clk) begin
    for (int k = NW - 1; k >= 0; k--)
      if (we[k]) mem[waddr[k*AW +: AW]] <= wdata[k*W +: W];
  end
  for (genvar p = 0; p < NR; p++) begin : g_read
    logic [W-1:0] r;
    always_ff @(posedge clk) r <= mem[raddr[p*AW +: AW]];
    assign rdata[p*W +: W] = r;
  end
endmodule

// The two-level loop nest of a GEMM or an ALU instruction (docs/isa.md): iteration (o, i) of
// outer x inner addresses a = a_base + o * a_so + i * a_si and b likewise.  `load` takes a new
// nest (its iteration (0, 0) is out the next cycle); each `step` moves to the next iteration;
// `last` says the current one is the nest's last.
module hapm_nest (
    input  logic        clk,
    input  logic        load,
    input  logic        step,
    input  logic [9:0]  outer,
    input  logic [9:0]  inner,
    input  logic [17:0] a_base,
    input  logic [13:0] a_so,
    input  logic [5:0]  a_si,
    input  logic [17:0] b_base,
    input  logic [13:0] b_so,
    input  logic [5:0]  b_si,
    output logic [31:0] a,
    output logic [31:0] b,
    output logic        last
);
  logic [9:0]  o, i, outer_q, inner_q;
  logic [13:0] a_so_q, b_so_q;
  logic [5:0]  a_si_q, b_si_q;
  logic [31:0] a_row, b_row;  // the addresses of (o, 0)
  assign last = (o == outer_q - 10'd1) && (i == inner_q - 10'd1);
  always_ff @(posedge clk) begin
    if (load) begin
      outer_q <= outer;
      inner_q <= inner;
      a_so_q <= a_so;
      a_si_q <= a_si;
      b_so_q <= b_so;
      b_si_q <= b_si;
      o <= '0;
      i <= '0;
      a_row <= 32'(a_base);
      a <= 32'(a_base);
      b_row <= 32'(b_base);
      b <= 32'(b_base);
    end else if (step) begin
      if (i == inner_q - 10'd1) begin
        i <= '0;
        o <= o + 10'd1;
        a_row <= a_row + 32'(a_so_q);
        a <= a_row + 32'(a_so_q);
        b_row <= b_row + 32'(b_so_q);
        b <= b_row + 32'(b_so_q);
      end else begin
        i <= i + 10'd1;
        a <= a + 32'(a_si_q);
        b <= b + 32'(b_si_q);
      end
    end
  end
endmodule
